//! The bank application's `jetsource-projector`.

fn main() -> std::process::ExitCode {
    jetsource::bin::projector(jetsource_bank::app())
}
