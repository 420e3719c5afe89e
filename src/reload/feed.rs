//! Following a PostgreSQL key store: the change feed (a LISTEN connection that wakes the loader
//! on every NOTIFY, plus a delta poll on an interval that catches whatever a lost notification
//! missed) and the usage flush (this proxy's call counts added to the store's totals).

use std::sync::Arc;

use tokio::sync::mpsc;

use super::Loader;
use crate::config::KeyStoreConfig;
use crate::store::postgres::UsageDelta;
use crate::store::PgStore;

/// Runs the change feed until the task is dropped.
pub fn spawn(
    loader: Arc<Loader>,
    pg: Arc<PgStore>,
    options: KeyStoreConfig,
) -> Vec<tokio::task::JoinHandle<()>> {
    let (trigger, mut woken) = mpsc::channel::<()>(1);
    let mut tasks = Vec::new();
    if options.notify {
        let pg = pg.clone();
        tasks.push(tokio::spawn(async move { pg.listen(trigger).await }));
    } else {
        drop(trigger);
    }
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(options.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Some(()) = woken.recv() => {}
            }
            loader.catch_up().await;
        }
    }));
    tasks
}

/// Flushes usage every `interval` until the task is dropped.
pub fn spawn_usage_flush(
    loader: Arc<Loader>,
    pg: Arc<PgStore>,
    interval: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = flush_usage(&loader, &pg).await {
                tracing::debug!(error = %e, "usage flush failed; the counts are kept for the next one");
            }
        }
    })
}

/// Adds every key's calls since the last flush to the store, in one statement. Counts stay
/// local (and are sent next time) when the store cannot be reached.
pub async fn flush_usage(loader: &Loader, pg: &PgStore) -> Result<usize, crate::store::StoreError> {
    let state = loader.state().load_full();
    let mut batch = Vec::new();
    let mut counted = Vec::new();
    for key in state.keys.records() {
        let usage = key.usage();
        let calls = usage.unflushed();
        if calls > 0 {
            batch.push(UsageDelta {
                id: key.id().to_string(),
                calls,
                last_used: usage.last_used(),
            });
            counted.push((key.index(), calls));
        }
    }
    let n = batch.len();
    pg.add_usage(batch).await?;
    for (index, calls) in counted {
        if let Some(key) = state.keys.get(index) {
            key.usage().mark_flushed(calls);
        }
    }
    Ok(n)
}
