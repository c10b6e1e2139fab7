//! The shop application's `shop-command`.

fn main() -> std::process::ExitCode {
    jetsource::bin::command(jetsource_shop::app())
}
