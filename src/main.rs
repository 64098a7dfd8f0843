//! The `metapass` command: everything is in [`metapass::cli`].

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    metapass::cli::main()
}
