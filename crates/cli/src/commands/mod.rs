/// `println!` that returns an error instead of panicking when stdout is gone (a closed pipe:
/// `medcoder icd search … | head`); `main` ends quietly on that error.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

pub mod assets;
pub mod bench;
pub mod bench_code;
pub mod bench_generate;
pub mod bench_join;
pub mod bench_serve;
pub mod bench_train;
pub mod code;
pub mod code_engine;
pub mod eval;
pub mod export;
pub mod generate;
pub mod icd;
pub mod merge;
pub mod models;
pub mod prepare;
pub mod serve;
pub mod train;

/// Print a value as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
