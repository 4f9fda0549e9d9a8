//! `erel-boot`, the boot agent. The program lives in the library (see `erel_boot::main`),
//! so that the end-to-end tests can build the same program.

fn main() -> std::process::ExitCode {
    erel_boot::main()
}
