//! The bank application's `jetsource-command`.

fn main() -> std::process::ExitCode {
    jetsource::bin::command(jetsource_bank::app())
}
