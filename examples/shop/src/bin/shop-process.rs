//! The shop application's `shop-process`: drives the fulfilment process.

fn main() -> std::process::ExitCode {
    jetsource::bin::process(jetsource_shop::app())
}
