//! The `metapass` command: everything is in [`metapass::cli`].

#![forbid(unsafe_code)]

/// mimalloc for the whole process (see Cargo.toml for why); a zeroing or hardened allocator is
/// not what protects secrets here: they are zeroized where they are dropped (`secrecy`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    metapass::cli::main()
}
