//! The shop application's `shop-snapshotter`.

fn main() -> std::process::ExitCode {
    jetsource::bin::snapshotter(jetsource_shop::app())
}
