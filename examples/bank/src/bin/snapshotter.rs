//! The bank application's `jetsource-snapshotter`.

fn main() -> std::process::ExitCode {
    jetsource::bin::snapshotter(jetsource_bank::app())
}
