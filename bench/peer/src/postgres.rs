//! A private PostgreSQL instance: initdb into a temporary directory, started
//! with pg_ctl on a free loopback port, stopped and deleted on drop. Like
//! the nats-server and redis-server of jetsource's benchmark, it is started
//! by the benchmark itself so that nothing else shares it, and no system
//! service or configuration is touched.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context as _};
use tempfile::TempDir;

/// Where Debian's `postgresql` package puts the server binaries (one
/// directory per major version; none of them is on PATH).
const DEBIAN_BIN_DIRS: &str = "/usr/lib/postgresql";

#[derive(Debug)]
pub struct Postgres {
    /// Holds `data/` (the cluster), the Unix socket and `postgres.log`.
    dir: TempDir,
    bin: PathBuf,
    /// The unprivileged user that runs the server when we are root
    /// (initdb and postgres refuse to run as root).
    user: Option<String>,
    port: u16,
    options: String,
    running: bool,
}

impl Postgres {
    /// Creates and starts an instance with `settings` (`-c name=value`).
    pub fn start(settings: &[(&str, String)]) -> anyhow::Result<Self> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("jetsource-peer-pg.")
            .tempdir()
            .context("cannot create a temporary directory")?;
        let user = if running_as_root() {
            let user = unprivileged_user()?;
            let (uid, gid) = ids_of(&user)?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .with_context(|| format!("cannot give {} to {user}", dir.path().display()))?;
            Some(user)
        } else {
            None
        };
        let port = free_port()?;
        let mut options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1",
            dir.path().display()
        );
        for (name, value) in settings {
            options.push_str(&format!(" -c {name}={value}"));
        }
        let mut pg = Self {
            dir,
            bin,
            user,
            port,
            options,
            running: false,
        };
        let data = pg.data_dir();
        pg.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "--auth=trust".as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--encoding=UTF8".as_ref(),
                "--locale=C".as_ref(),
                // A throw-away cluster: initdb's own fsyncs buy nothing.
                "--no-sync".as_ref(),
            ],
        )?;
        pg.start_server()?;
        Ok(pg)
    }

    /// `postgres://` URL over TCP loopback, as jetsource's clients reach
    /// nats-server.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops and starts the server: its buffer cache is empty afterwards
    /// (the operating system's file cache is not).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.start_server()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn start_server(&mut self) -> anyhow::Result<()> {
        let data = self.data_dir();
        let log = self.dir.path().join("postgres.log");
        let result = self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-o".as_ref(),
                self.options.as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "120".as_ref(),
                "start".as_ref(),
            ],
        );
        if let Err(e) = result {
            // `-w` gave up waiting, but the server may still come up.
            let _ = self.pg_ctl_stop();
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("{e:#}\npostgres.log:\n{}", tail.join("\n"));
        }
        self.running = true;
        Ok(())
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        if !self.running {
            return Ok(());
        }
        self.pg_ctl_stop()?;
        self.running = false;
        Ok(())
    }

    fn pg_ctl_stop(&self) -> anyhow::Result<()> {
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                "fast".as_ref(),
                "-w".as_ref(),
                "stop".as_ref(),
            ],
        )
    }

    /// Runs one of the server's programs, as `self.user` when set.
    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) -> anyhow::Result<()> {
        let path = self.bin.join(program);
        let mut command = match &self.user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&path);
                c
            }
            None => Command::new(&path),
        };
        // The user may not be allowed into our working directory, and
        // postgres refuses to start where it cannot resolve its own path.
        command
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        let output: Output = command
            .output()
            .with_context(|| format!("cannot run {}", path.display()))?;
        if !output.status.success() {
            bail!(
                "{program} failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr),
                String::from_utf8_lossy(&output.stdout)
            );
        }
        Ok(())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("stopping PostgreSQL: {e:#}");
        }
        // The TempDir's own drop deletes the directory.
    }
}

/// `$PG_BIN` if set, else the newest `/usr/lib/postgresql/<major>/bin` that
/// has initdb and pg_ctl.
fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(DEBIAN_BIN_DIRS)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((major, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "no PostgreSQL server under {DEBIAN_BIN_DIRS}/*/bin: install the Debian package \
             `postgresql` (`make bench-peer` does), or set PG_BIN to the directory of initdb and pg_ctl"
        ),
    }
}

fn running_as_root() -> bool {
    // The effective uid is the second field of `Uid:`.
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap_or(false)
}

/// `postgres` (created by Debian's package), else `nobody`.
fn unprivileged_user() -> anyhow::Result<String> {
    for user in ["postgres", "nobody"] {
        if ids_of(user).is_ok() {
            return Ok(user.to_owned());
        }
    }
    bail!("running as root and there is no user `postgres` or `nobody` to run PostgreSQL as")
}

/// uid and gid of `user` from /etc/passwd.
fn ids_of(user: &str) -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string(Path::new("/etc/passwd"))?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.first() == Some(&user) && fields.len() > 3 {
            return Ok((fields[2].parse()?, fields[3].parse()?));
        }
    }
    bail!("no user {user}")
}

fn free_port() -> anyhow::Result<u16> {
    // Bound and released at once: another process could take it before
    // postgres does, which pg_ctl would then report.
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
