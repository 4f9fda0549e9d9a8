//! `erel-boot`, the boot agent. Everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    erel_boot::cli::main()
}
