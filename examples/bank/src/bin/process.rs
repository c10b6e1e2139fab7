//! The bank's `jetsource-process`: drives the loyalty process.

fn main() -> std::process::ExitCode {
    jetsource::bin::process(jetsource_bank::app())
}
