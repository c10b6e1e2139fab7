//! The shop application's CLI, `shop`.

fn main() -> std::process::ExitCode {
    jetsource::bin::cli(jetsource_shop::app())
}
