//! The boot agent, built inside the test crate so its tests can run it.

fn main() -> std::process::ExitCode {
    erel_boot::main()
}
