//! The bank application's `jetsource`.

fn main() -> std::process::ExitCode {
    jetsource::bin::cli(jetsource_bank::app())
}
