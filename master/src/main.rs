//! `erel`, the master. Everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    erel_master::cli::main()
}
