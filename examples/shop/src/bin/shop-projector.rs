//! The shop application's `shop-projector`.

fn main() -> std::process::ExitCode {
    jetsource::bin::projector(jetsource_shop::app())
}
