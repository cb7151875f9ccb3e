//! `pictor-scheduler`: reports, budget and health alerts, and the monthly export.

/// mimalloc in place of glibc's malloc: a job's many short-lived allocations (JSON, headers,
/// Redis replies) cost the worker and the api about a tenth of their CPU in glibc's free
/// lists (docs/benchmarks.md, "Cuts (issue 20)").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    scheduler::cli_main()
}
