//! `pictor admin purge-langgraph-checkpoints`: the command-line face of `cli::legacy`. A dry
//! run (the default) prints what the retired LangGraph service left in Redis, per key family,
//! with counts and sizes; `--execute` deletes it in batches with a progress bar on stderr.
//! Pictor's own keys (`PICTOR_REDIS_PREFIX`) are never touched.

use std::num::NonZeroUsize;

use anyhow::Context;
use clap::Args;
use cli::legacy::{Checkpoints, Indexes, PurgeOptions, Tally};
use indicatif::{ProgressBar, ProgressStyle};
use secrecy::SecretString;
use shared::config::Settings;

#[derive(Args)]
pub struct PurgeArgs {
    /// Delete the keys. Without it the command is a dry run that deletes nothing.
    #[arg(long)]
    execute: bool,
    /// Keys per SCAN call (its COUNT) and per UNLINK.
    #[arg(long, default_value_t = NonZeroUsize::new(500).unwrap_or(NonZeroUsize::MIN))]
    batch_size: NonZeroUsize,
    /// The Redis that holds the old checkpoints, `redis://host:port/db` (default: Pictor's,
    /// PICTOR_REDIS_URL). Keys under Pictor's prefix are protected either way.
    #[arg(long)]
    redis_url: Option<String>,
    /// Only threads whose id starts with this (for a canary purge of some threads first).
    /// RediSearch indexes are dropped only by a purge of every thread.
    #[arg(long)]
    thread_prefix: Option<String>,
    /// Keep the old RediSearch indexes when executing (they are dropped by default).
    #[arg(long)]
    keep_indexes: bool,
}

pub async fn run(settings: &Settings, args: PurgeArgs) -> anyhow::Result<()> {
    let url = args
        .redis_url
        .map_or_else(|| settings.redis.url.clone(), SecretString::from);
    // The URL may hold a password: it is never printed.
    let mut checkpoints = Checkpoints::connect(&url, settings.redis.timeout)
        .await
        .context("cannot connect to redis")?;
    let options = PurgeOptions {
        batch_size: args.batch_size,
        protected_prefix: settings.redis.prefix.clone(),
        thread_prefix: args.thread_prefix,
    };

    let scanning = spinner("measuring");
    let survey = checkpoints
        .survey(&options, |keys| scanning.inc(keys))
        .await
        .context("cannot read the old checkpoints")?;
    scanning.finish_and_clear();
    let indexes = checkpoints
        .indexes()
        .await
        .context("cannot list RediSearch indexes")?;

    let mode = if args.execute {
        "found, deleting now"
    } else {
        "dry run: nothing deleted"
    };
    println!("LangGraph checkpoint data ({mode})");
    print!("{}", table(&survey));
    println!(
        "sizes: MEMORY USAGE of every key, pipelined per batch of {}; \
         nested values are sampled, so they are estimates",
        options.batch_size
    );
    println!(
        "left alone: {} matching key(s) under Pictor's prefix {:?}",
        survey.protected(),
        options.protected_prefix
    );
    let drop_indexes = args.execute && !args.keep_indexes && options.thread_prefix.is_none();
    match &indexes {
        Indexes::ModuleMissing => {
            println!("RediSearch indexes: none (this Redis has no RediSearch module)");
        }
        Indexes::Found(names) if names.is_empty() => {
            println!("RediSearch indexes: none of the old checkpointer's exist");
        }
        Indexes::Found(names) => println!("RediSearch indexes: {}", names.join(", ")),
    }

    if !args.execute {
        println!("run again with --execute to delete these keys");
        return Ok(());
    }
    let bar = ProgressBar::new(survey.keys());
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} keys deleted ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let purged = checkpoints
        .purge(&options, |keys| {
            // Keys written since the survey may push past the first count.
            if bar.position() + keys > bar.length().unwrap_or(0) {
                bar.set_length(bar.position() + keys);
            }
            bar.inc(keys);
        })
        .await
        .context("the purge stopped; run it again to finish")?;
    bar.finish_and_clear();
    println!(
        "deleted {} key(s); left {} key(s) under Pictor's prefix",
        purged.keys(),
        purged.protected()
    );
    if let (true, Indexes::Found(names)) = (drop_indexes, &indexes) {
        let dropped = checkpoints
            .drop_indexes(names)
            .await
            .context("cannot drop the RediSearch indexes")?;
        if !dropped.is_empty() {
            println!("dropped RediSearch indexes: {}", dropped.join(", "));
        }
    }
    Ok(())
}

fn spinner(message: &'static str) -> ProgressBar {
    let spinner = ProgressBar::new_spinner();
    spinner.set_style(
        ProgressStyle::with_template("{spinner} {msg}: {pos} keys")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    spinner.set_message(message);
    spinner
}

/// The survey as an aligned table, one line per family and a total.
fn table(tally: &Tally) -> String {
    let width = tally
        .families
        .iter()
        .map(|family| family.pattern.len())
        .max()
        .unwrap_or(0)
        .max("pattern".len());
    let line = |family: &str, pattern: &str, keys: &str, size: &str| {
        format!("{family:<22} {pattern:<width$} {keys:>10} {size:>12}\n")
    };
    let mut out = line("family", "pattern", "keys", "size");
    for family in &tally.families {
        out.push_str(&line(
            family.family.name,
            &family.pattern,
            &family.keys.to_string(),
            &human_bytes(family.bytes),
        ));
    }
    out.push_str(&line(
        "total",
        "",
        &tally.keys().to_string(),
        &human_bytes(tally.bytes()),
    ));
    out
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use cli::legacy::{FAMILIES, FamilyTally};

    #[test]
    fn the_table_has_a_line_per_family_and_a_total() {
        let tally = Tally {
            families: FAMILIES
                .iter()
                .map(|family| FamilyTally {
                    family: *family,
                    pattern: family.pattern(None),
                    keys: 2,
                    bytes: 1024,
                    protected: 0,
                })
                .collect(),
        };
        let text = table(&tally);
        assert_eq!(text.lines().count(), 7, "{text}");
        assert!(text.contains("checkpoint_latest:*"), "{text}");
        let total = text.lines().last().unwrap_or_default();
        assert!(total.starts_with("total"), "{text}");
        assert!(
            total.contains(" 10 ") && total.ends_with("5.0 KiB"),
            "{text}"
        );
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }
}
