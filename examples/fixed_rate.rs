//! A small open-loop HTTP/1.1 load generator for latency at a fixed request rate.
//!
//! `fixed_rate URL --rate R --connections C --duration SECS [--warmup SECS] [-H 'Name: value']...`
//!
//! Request `i` is due at `start + i / R` and goes on keep-alive connection `i mod C`, one blocking
//! thread per connection. When a connection is still busy with its previous request at the due
//! time, the latency is counted from the due time (the server's slowness delays the request, as
//! wrk2 counts it, so stalls are not hidden by coordinated omission); otherwise from the moment the
//! request is written, so the generator's own timer slack is not charged to the server.
//! Prints one line of `key=value` pairs: requests, errors, statuses and latency percentiles (µs).
//! Used by `benches/load/run.sh`; loopback only, bounded by `--duration`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

struct Options {
    host: String,
    request: Vec<u8>,
    rate: f64,
    connections: usize,
    duration: Duration,
    warmup: Duration,
}

/// What one connection saw.
#[derive(Default)]
struct Tally {
    /// Latencies in nanoseconds of the requests due after the warm-up.
    latencies: Vec<u64>,
    /// Requests sent, warm-up included (for CPU per request).
    sent: u64,
    errors: u64,
    /// Requests that found their connection still busy at their due time.
    late: u64,
    statuses: BTreeMap<u16, u64>,
}

fn main() -> anyhow::Result<()> {
    let options = parse_args()?;
    let start = Instant::now() + Duration::from_millis(200);
    let workers: Vec<_> = (0..options.connections)
        .map(|c| {
            let host = options.host.clone();
            let request = options.request.clone();
            let (rate, n, duration, warmup) = (
                options.rate,
                options.connections,
                options.duration,
                options.warmup,
            );
            std::thread::spawn(move || {
                run_connection(&host, &request, rate, n, c, start, duration, warmup)
            })
        })
        .collect();
    let mut total = Tally::default();
    for worker in workers {
        let Ok(tally) = worker.join() else {
            bail!("a connection thread panicked");
        };
        total.latencies.extend(tally.latencies);
        total.sent += tally.sent;
        total.errors += tally.errors;
        total.late += tally.late;
        for (status, count) in tally.statuses {
            *total.statuses.entry(status).or_default() += count;
        }
    }
    report(&mut total, &options);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_connection(
    host: &str,
    request: &[u8],
    rate: f64,
    connections: usize,
    index: usize,
    start: Instant,
    duration: Duration,
    warmup: Duration,
) -> Tally {
    let mut tally = Tally::default();
    let mut stream: Option<TcpStream> = None;
    let mut buffer = vec![0u8; 64 * 1024];
    let mut previous_done = start;
    for k in 0.. {
        let seq = k * connections + index;
        let offset = Duration::from_secs_f64(seq as f64 / rate);
        if offset >= duration {
            break;
        }
        let due = start + offset;
        let now = Instant::now();
        if now < due {
            std::thread::sleep(due - now);
        }
        let sent = Instant::now();
        let began = if previous_done > due {
            tally.late += 1;
            due
        } else {
            sent
        };
        tally.sent += 1;
        let outcome = exchange(&mut stream, host, request, &mut buffer);
        let done = Instant::now();
        previous_done = done;
        match outcome {
            Ok(status) => {
                *tally.statuses.entry(status).or_default() += 1;
                if offset >= warmup {
                    tally.latencies.push((done - began).as_nanos() as u64);
                }
            }
            Err(_) => {
                tally.errors += 1;
                stream = None;
            }
        }
    }
    tally
}

/// Sends one request on the connection (opening it if needed) and reads the whole response.
fn exchange(
    stream: &mut Option<TcpStream>,
    host: &str,
    request: &[u8],
    buffer: &mut [u8],
) -> anyhow::Result<u16> {
    if stream.is_none() {
        let s = TcpStream::connect(host)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        *stream = Some(s);
    }
    let Some(s) = stream.as_mut() else {
        bail!("no connection");
    };
    s.write_all(request)?;
    let mut filled = 0;
    loop {
        let n = s.read(&mut buffer[filled..])?;
        if n == 0 {
            bail!("connection closed");
        }
        filled += n;
        if let Some(status) = complete_response(&buffer[..filled])? {
            return Ok(status);
        }
        if filled == buffer.len() {
            bail!("response too large");
        }
    }
}

/// The status when `data` holds one whole response (Content-Length or chunked body).
fn complete_response(data: &[u8]) -> anyhow::Result<Option<u16>> {
    let Some(head_end) = find(data, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&data[..head_end]).context("response head is not text")?;
    let status: u16 = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .context("bad status line")?;
    let body = &data[head_end + 4..];
    let mut length = None;
    let mut chunked = false;
    for line in head.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.trim().parse::<usize>()?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let whole = match (chunked, length) {
        (true, _) => body.ends_with(b"0\r\n\r\n"),
        (false, Some(n)) => body.len() >= n,
        (false, None) => status == 204 || status == 304 || status < 200,
    };
    Ok(whole.then_some(status))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn report(total: &mut Tally, options: &Options) {
    total.latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if total.latencies.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * total.latencies.len() as f64).ceil() as usize;
        let i = rank.clamp(1, total.latencies.len()) - 1;
        total.latencies[i] as f64 / 1000.0
    };
    let statuses: Vec<String> = total
        .statuses
        .iter()
        .map(|(s, n)| format!("{s}:{n}"))
        .collect();
    let measured = (options.duration - options.warmup).as_secs_f64();
    println!(
        "sent={} recorded={} achieved_rps={:.0} errors={} late={} statuses={} p50_us={:.1} p90_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1}",
        total.sent,
        total.latencies.len(),
        total.latencies.len() as f64 / measured,
        total.errors,
        total.late,
        statuses.join(","),
        pct(50.0),
        pct(90.0),
        pct(99.0),
        pct(99.9),
        pct(100.0),
    );
}

fn parse_args() -> anyhow::Result<Options> {
    let mut args = std::env::args().skip(1);
    let mut url = None;
    let mut headers = String::new();
    let (mut rate, mut connections, mut duration, mut warmup) = (1000.0, 16, 10.0, 1.0);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--rate" => rate = value()?.parse()?,
            "--connections" => connections = value()?.parse()?,
            "--duration" => duration = value()?.parse()?,
            "--warmup" => warmup = value()?.parse()?,
            "-H" => {
                headers.push_str(&value()?);
                headers.push_str("\r\n");
            }
            _ if url.is_none() && arg.starts_with("http://") => url = Some(arg),
            _ => bail!("unexpected argument {arg:?}; usage: fixed_rate http://HOST:PORT/PATH --rate R --connections C --duration S [--warmup S] [-H 'N: v']..."),
        }
    }
    let url = url.context("give a URL http://HOST:PORT/PATH")?;
    let rest = url.trim_start_matches("http://");
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if !(rate > 0.0 && connections > 0 && duration > warmup) {
        bail!("need rate > 0, connections > 0 and duration > warmup");
    }
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: fixed_rate\r\n{headers}\r\n");
    Ok(Options {
        host: host.to_string(),
        request: request.into_bytes(),
        rate,
        connections,
        duration: Duration::from_secs_f64(duration),
        warmup: Duration::from_secs_f64(warmup),
    })
}
