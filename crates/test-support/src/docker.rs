//! The testcontainers backend, chosen with `JETSOURCE_TEST_BACKEND=docker`.
//!
//! Each container is driven from a thread of its own with its own runtime,
//! so it can be started, restarted and removed from synchronous code and from
//! inside a test's tokio runtime alike.

use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;

use testcontainers::core::{IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{GenericImage, ImageExt};
use tokio::sync::mpsc;

/// What a test server needs from a container.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub image: &'static str,
    pub tag: &'static str,
    pub ready_on_stderr: Option<&'static str>,
    pub ready_on_stdout: Option<&'static str>,
    pub container_port: u16,
    pub cmd: Vec<String>,
    pub files: Vec<(String, Vec<u8>)>,
}

enum Op {
    Restart(std_mpsc::Sender<Result<(), String>>),
    Stop(std_mpsc::Sender<Result<(), String>>),
    Start(std_mpsc::Sender<Result<(), String>>),
    Remove,
}

#[derive(Debug)]
pub(crate) struct Container {
    control: mpsc::UnboundedSender<Op>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Restart(_) => "Restart",
            Op::Stop(_) => "Stop",
            Op::Start(_) => "Start",
            Op::Remove => "Remove",
        })
    }
}

/// Whether the environment asks for the Docker backend.
pub(crate) fn selected() -> bool {
    match std::env::var("JETSOURCE_TEST_BACKEND").as_deref() {
        Ok("docker") => true,
        Ok("process") | Err(_) => false,
        Ok(other) => {
            panic!("JETSOURCE_TEST_BACKEND={other:?}: use \"process\" (default) or \"docker\"")
        }
    }
}

impl Container {
    /// Starts `spec` with its port published on 127.0.0.1:`host_port`.
    pub(crate) fn start(spec: Spec, host_port: u16) -> Result<Self, String> {
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let (control, mut ops) = mpsc::unbounded_channel::<Op>();
        let thread = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            runtime.block_on(async move {
                let mut image = GenericImage::new(spec.image, spec.tag)
                    .with_exposed_port(spec.container_port.tcp());
                if let Some(line) = spec.ready_on_stderr {
                    image = image.with_wait_for(WaitFor::message_on_stderr(line));
                }
                if let Some(line) = spec.ready_on_stdout {
                    image = image.with_wait_for(WaitFor::message_on_stdout(line));
                }
                let mut request = image
                    .with_mapped_port(host_port, spec.container_port.tcp())
                    .with_cmd(spec.cmd.clone());
                for (path, data) in spec.files.clone() {
                    request = request.with_copy_to(path, data);
                }
                let container = match request.start().await {
                    Ok(container) => container,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                while let Some(op) = ops.recv().await {
                    match op {
                        Op::Restart(done) => {
                            let result = async {
                                container
                                    .stop_with_timeout(Some(0))
                                    .await
                                    .map_err(|e| e.to_string())?;
                                container.start().await.map_err(|e| e.to_string())
                            }
                            .await;
                            let _ = done.send(result);
                        }
                        Op::Stop(done) => {
                            let result = container
                                .stop_with_timeout(Some(0))
                                .await
                                .map_err(|e| e.to_string());
                            let _ = done.send(result);
                        }
                        Op::Start(done) => {
                            let result = container.start().await.map_err(|e| e.to_string());
                            let _ = done.send(result);
                        }
                        Op::Remove => break,
                    }
                }
                let _ = container.rm().await;
            });
        });
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                control,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err("the container thread died".into()),
        }
    }

    /// Kills the container (no grace period) and starts it again; its file
    /// system, and so the server's data, is kept.
    pub(crate) fn restart(&self) -> Result<(), String> {
        self.run(Op::Restart)
    }

    /// Kills the container (no grace period); [`Container::start_again`]
    /// starts it again with its file system.
    pub(crate) fn stop(&self) -> Result<(), String> {
        self.run(Op::Stop)
    }

    pub(crate) fn start_again(&self) -> Result<(), String> {
        self.run(Op::Start)
    }

    fn run(&self, op: fn(std_mpsc::Sender<Result<(), String>>) -> Op) -> Result<(), String> {
        let (done_tx, done_rx) = std_mpsc::channel();
        self.control
            .send(op(done_tx))
            .map_err(|_| "the container thread is gone".to_owned())?;
        done_rx
            .recv()
            .map_err(|_| "the container thread died".to_owned())?
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.control.send(Op::Remove);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
