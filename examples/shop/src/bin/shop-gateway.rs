//! The shop application's `shop-gateway`.

fn main() -> std::process::ExitCode {
    jetsource::bin::gateway(jetsource_shop::app())
}
