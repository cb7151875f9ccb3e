//! `pictor-scheduler`: reports, budget and health alerts, and the monthly export.

fn main() -> anyhow::Result<()> {
    scheduler::cli_main()
}
