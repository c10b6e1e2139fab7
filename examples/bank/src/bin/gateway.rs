//! The bank application's `jetsource-gateway`.

fn main() -> std::process::ExitCode {
    jetsource::bin::gateway(jetsource_bank::app())
}
