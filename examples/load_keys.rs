//! Measures what loading a large keys file costs: wall time and peak memory of one process.
//!
//! `load_keys write FILE [N]` writes a keys file of N (default 1,000,000) benchmark keys;
//! `load_keys load FILE` compiles it the way the proxy does on start and on reload (streamed from
//! disk), `load_keys load-text FILE` from its whole text in memory; both print the wall time and
//! the process's peak RSS (`VmHWM` from /proc/self/status). Separate processes, so the generator's
//! memory does not count against the loader.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use portcullis::keys::{self, KeyLookup, UsageTable};

#[path = "../benches/workload/mod.rs"]
mod workload;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["write", file] => write(file, 1_000_000),
        ["write", file, n] => write(file, n.parse().context("N must be a number")?),
        ["load", file] => load(file, false),
        ["load-text", file] => load(file, true),
        _ => bail!("usage: load_keys write FILE [N] | load_keys load|load-text FILE"),
    }
}

fn write(file: &str, n: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    std::fs::write(file, workload::keys_yaml(n)).with_context(|| format!("writing {file}"))?;
    println!("wrote {n} keys to {file} in {:.2?}", started.elapsed());
    Ok(())
}

fn load(file: &str, from_text: bool) -> anyhow::Result<()> {
    let policy = portcullis::policy::compile(&workload::policy_yaml(100))
        .map_err(|p| anyhow::anyhow!("policy: {p:?}"))?;
    let usage = Arc::new(UsageTable::default());
    let baseline = peak_rss_kib()?;
    let started = Instant::now();
    let compiled = if from_text {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
        keys::compile(&text, &policy, None, &usage)
    } else {
        keys::compile_path(Path::new(file), &policy, None, &usage).map(|c| c.compiled)
    }
    .map_err(|p| anyhow::anyhow!("compile: {:?}", p.first()))?;
    let elapsed = started.elapsed();
    let n = compiled.store.len();
    let probe = workload::bench_key(n / 2);
    if !matches!(compiled.store.lookup(&probe, 0), KeyLookup::Valid(_)) {
        bail!("key {} not found after loading", n / 2);
    }
    let how = if from_text {
        "keys::compile (text in memory)"
    } else {
        "keys::compile_path (streamed, as the proxy loads)"
    };
    println!("{how}: {n} keys in {elapsed:.2?}");
    println!(
        "peak RSS {} MiB (before loading {} MiB); RSS holding the store {} MiB",
        peak_rss_kib()? / 1024,
        baseline / 1024,
        current_rss_kib()? / 1024
    );
    Ok(())
}

fn peak_rss_kib() -> anyhow::Result<u64> {
    status_field("VmHWM:")
}

fn current_rss_kib() -> anyhow::Result<u64> {
    status_field("VmRSS:")
}

fn status_field(name: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with(name))
        .with_context(|| format!("{name} missing from /proc/self/status"))?;
    let kib = line[name.len()..].trim().trim_end_matches("kB").trim();
    Ok(kib.parse()?)
}
