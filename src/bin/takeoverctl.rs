//! takeoverctl: the operator's command for the HA pair. It only talks to hapaird's control
//! socket (newline-delimited JSON, see `hapair::core::control`).
//!
//! Exit status, for scripts:
//! - 0: done (status shown; takeover/giveback completed, or started with `--no-wait`; alarms
//!   acknowledged; check passed)
//! - 1: refused; the reasons are printed ("cannot take over: partner log not mirrored since
//!   2024-05-01 12:04:07+02:00")
//! - 2: usage error (bad arguments, unknown node or alarm id, value out of range)
//! - 3: hapaird unreachable (no socket, connection refused, daemon stopping)
//! - 4: failed: started but did not complete (e.g. fence failed, this node was fenced)
//! - 5: timed out: still in progress when `--timeout` ended (follow with `status`/`watch`)
//! - 6: protocol error (malformed or incompatible reply)
//! - 7: busy: the daemon is overloaded; retry

use clap::{Parser, Subcommand};
use hapair::core::control::{
    self, encode_request, parse_duration_ms, parse_reply, refusal_prefix, ErrorKind, Outcome,
    PairStatus, Reply, Request,
};
use hapair::io::clock;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const EXIT_OK: u8 = 0;
const EXIT_REFUSED: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_UNREACHABLE: u8 = 3;
const EXIT_FAILED: u8 = 4;
const EXIT_TIMED_OUT: u8 = 5;
const EXIT_PROTOCOL: u8 = 6;
const EXIT_BUSY: u8 = 7;

/// Longest reply line accepted from the daemon.
const MAX_REPLY_BYTES: u64 = 4 << 20;

/// Operate the hapair HA pair: status, takeover, giveback, alarm acknowledgement.
///
/// Exit status: 0 ok, 1 refused (reasons printed), 2 usage, 3 hapaird unreachable, 4 failed
/// after starting, 5 timed out while still in progress, 6 protocol error, 7 daemon busy.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// hapaird's control socket.
    #[arg(long, global = true, default_value = "/run/hapair/hapaird.sock")]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show both nodes, their states, the log mirror, who serves which aggregate, the last
    /// takeover with its phase timings, refusals and alarms.
    Status {
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take over. Without --of (or --of THIS-NODE): ask the partner to take this node over.
    /// With --of PARTNER: take the partner over from here.
    Takeover {
        /// The node to take over (default: this node, asking the partner).
        #[arg(long, value_name = "NODE")]
        of: Option<String>,
        /// Time the partner gets for its graceful shutdown (e.g. 30s, 2m; default: configured).
        #[arg(long, value_name = "DUR", value_parser = parse_duration_ms, conflicts_with = "immediate")]
        countdown: Option<u64>,
        /// No graceful shutdown: tell the partner to stop and fence it now.
        #[arg(long)]
        immediate: bool,
        /// Only run the checks and say what would refuse it.
        #[arg(long)]
        check_only: bool,
        /// Return once the takeover started instead of when it completed.
        #[arg(long)]
        no_wait: bool,
        /// Longest wait for completion (e.g. 10m).
        #[arg(long, value_name = "DUR", value_parser = parse_duration_ms)]
        timeout: Option<u64>,
        /// Print the reply as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Give the partner's aggregates back (run on the node that took over).
    Giveback {
        /// Return once the giveback started instead of when it completed.
        #[arg(long)]
        no_wait: bool,
        /// Longest wait for completion (e.g. 10m).
        #[arg(long, value_name = "DUR", value_parser = parse_duration_ms)]
        timeout: Option<u64>,
        /// Print the reply as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a line on every status change until interrupted.
    Watch {
        /// Print every status as a JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Alarms of this node (`status` lists them with their ids).
    Alarm {
        #[command(subcommand)]
        cmd: AlarmCmd,
    },
}

#[derive(Subcommand)]
enum AlarmCmd {
    /// Acknowledge alarms: you have seen them. An acknowledged alarm whose condition still
    /// holds stays in the headline, marked acknowledged; one that clears and comes back is
    /// raised again under a new id. An unknown id acknowledges nothing (exit 2).
    Ack {
        /// Alarm ids as `status` shows them (#3 or 3).
        #[arg(value_name = "ID", value_parser = parse_alarm_id, required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<u64>,
        /// Every alarm not acknowledged yet.
        #[arg(long)]
        all: bool,
        /// Print the reply as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn parse_alarm_id(text: &str) -> Result<u64, String> {
    text.trim_start_matches('#')
        .parse::<u64>()
        .ok()
        .filter(|i| *i > 0)
        .ok_or_else(|| format!("{text:?} is not an alarm id (a number as `status` shows it)"))
}

fn offset() -> i64 {
    clock::local_utc_offset_s(clock::unix_ms())
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("takeoverctl: {msg}");
    ExitCode::from(code)
}

struct Conn {
    w: UnixStream,
    r: BufReader<UnixStream>,
    socket: PathBuf,
}

impl Conn {
    fn open(socket: &PathBuf, read_timeout: Option<Duration>) -> Result<Conn, ExitCode> {
        let s = UnixStream::connect(socket).map_err(|e| {
            fail(
                EXIT_UNREACHABLE,
                format!("cannot reach hapaird at {}: {e}", socket.display()),
            )
        })?;
        s.set_read_timeout(read_timeout)
            .map_err(|e| fail(EXIT_UNREACHABLE, e))?;
        let r = BufReader::new(s.try_clone().map_err(|e| fail(EXIT_UNREACHABLE, e))?);
        Ok(Conn {
            w: s,
            r,
            socket: socket.clone(),
        })
    }

    fn send(&mut self, req: &Request) -> Result<(), ExitCode> {
        self.w.write_all(&encode_request(req)).map_err(|e| {
            fail(
                EXIT_UNREACHABLE,
                format!("writing to {}: {e}", self.socket.display()),
            )
        })
    }

    /// One reply line, raw and parsed.
    fn recv(&mut self) -> Result<(String, Reply), ExitCode> {
        let mut line = Vec::new();
        let n = (&mut self.r)
            .take(MAX_REPLY_BYTES)
            .read_until(b'\n', &mut line)
            .map_err(|e| {
                let code = if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut
                {
                    EXIT_TIMED_OUT
                } else {
                    EXIT_UNREACHABLE
                };
                fail(code, format!("reading from {}: {e}", self.socket.display()))
            })?;
        if n == 0 {
            return Err(fail(EXIT_UNREACHABLE, "hapaird closed the connection"));
        }
        let reply = parse_reply(&line).map_err(|e| fail(EXIT_PROTOCOL, e))?;
        Ok((String::from_utf8_lossy(&line).trim_end().to_string(), reply))
    }
}

use std::io::Read;

fn error_exit(kind: ErrorKind, message: &str) -> ExitCode {
    let code = match kind {
        ErrorKind::UnknownNode | ErrorKind::UnknownAlarm | ErrorKind::InvalidArgument => EXIT_USAGE,
        ErrorKind::Busy => EXIT_BUSY,
        ErrorKind::Unavailable => EXIT_UNREACHABLE,
        ErrorKind::Malformed | ErrorKind::TooLong | ErrorKind::UnsupportedVersion => EXIT_PROTOCOL,
    };
    fail(code, message)
}

/// A procedure's total time and its phases, each "Step 12 ms", for the operator.
fn timings(r: &control::ProcedureView) -> (String, Vec<String>) {
    let total = r.total_ms.map_or("?".into(), control::duration);
    let phases = r
        .phases
        .iter()
        .map(|p| format!("{} {}", p.step, control::duration(p.elapsed_ms)))
        .collect();
    (total, phases)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(c) | Err(c) => c,
    }
}

fn run(cli: Cli) -> Result<ExitCode, ExitCode> {
    match cli.cmd {
        Cmd::Status { json } => {
            let mut c = Conn::open(&cli.socket, Some(Duration::from_secs(30)))?;
            c.send(&Request::Status)?;
            let (raw, reply) = c.recv()?;
            match reply {
                Reply::Status { status } => {
                    if json {
                        let pretty: serde_json::Value =
                            serde_json::from_str(&raw).map_err(|e| fail(EXIT_PROTOCOL, e))?;
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&pretty["status"]).unwrap_or_default()
                        );
                    } else {
                        print!("{}", control::render_status(&status, offset()));
                    }
                    Ok(ExitCode::from(EXIT_OK))
                }
                Reply::Error { kind, message } => Err(error_exit(kind, &message)),
                other => Err(fail(EXIT_PROTOCOL, format!("unexpected reply {other:?}"))),
            }
        }
        Cmd::Takeover {
            of,
            countdown,
            immediate,
            check_only,
            no_wait,
            timeout,
            json,
        } => {
            let req = Request::Takeover {
                of,
                countdown_ms: countdown,
                immediate,
                check_only,
                wait: !no_wait,
                timeout_ms: timeout,
            };
            operate(&cli.socket, req, timeout, json)
        }
        Cmd::Giveback {
            no_wait,
            timeout,
            json,
        } => {
            let req = Request::Giveback {
                wait: !no_wait,
                timeout_ms: timeout,
            };
            operate(&cli.socket, req, timeout, json)
        }
        Cmd::Alarm {
            cmd: AlarmCmd::Ack { ids, all, json },
        } => {
            let mut c = Conn::open(&cli.socket, Some(Duration::from_secs(30)))?;
            c.send(&Request::AckAlarms { ids, all })?;
            let (raw, reply) = c.recv()?;
            match reply {
                Reply::Acknowledged {
                    acknowledged,
                    already,
                    status,
                } => {
                    if json {
                        println!("{raw}");
                    } else {
                        print!("{}", ack_report(&acknowledged, &already, &status));
                    }
                    Ok(ExitCode::from(EXIT_OK))
                }
                Reply::Error { kind, message } => Err(error_exit(kind, &message)),
                other => Err(fail(EXIT_PROTOCOL, format!("unexpected reply {other:?}"))),
            }
        }
        Cmd::Watch { json } => {
            let mut c = Conn::open(&cli.socket, None)?;
            c.send(&Request::Watch)?;
            loop {
                let (raw, reply) = c.recv()?;
                match reply {
                    Reply::Status { status } => {
                        if json {
                            println!("{raw}");
                        } else {
                            println!("{}", watch_line(&status));
                        }
                        let _ = std::io::stdout().flush();
                    }
                    Reply::Error { kind, message } => return Err(error_exit(kind, &message)),
                    other => {
                        return Err(fail(EXIT_PROTOCOL, format!("unexpected reply {other:?}")))
                    }
                }
            }
        }
    }
}

/// What an acknowledgement did, for people: which alarms, and which of them still hold.
fn ack_report(acknowledged: &[u64], already: &[u64], s: &PairStatus) -> String {
    let ids = |v: &[u64]| {
        v.iter()
            .map(|i| format!("#{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut o = String::new();
    if acknowledged.is_empty() && already.is_empty() {
        o += &format!("{}: no alarm to acknowledge\n", s.node);
    }
    if !acknowledged.is_empty() {
        o += &format!("{}: acknowledged {}\n", s.node, ids(acknowledged));
    }
    if !already.is_empty() {
        o += &format!("already acknowledged: {}\n", ids(already));
    }
    for a in &s.alarms {
        let named =
            a.id.is_some_and(|i| acknowledged.contains(&i) || already.contains(&i));
        if named && a.open {
            o += &format!(
                "#{} still holds: {} (it stays in the headline until it clears)\n",
                a.id.unwrap_or_default(),
                a.text
            );
        }
    }
    o += &format!("{}\n", s.headline);
    o
}

fn watch_line(s: &PairStatus) -> String {
    let off = offset();
    let states: Vec<String> = s
        .nodes
        .iter()
        .map(|n| {
            format!(
                "{} {}",
                n.name,
                n.state.map_or("unknown".into(), |x| format!("{x:?}"))
            )
        })
        .collect();
    let running = s.running.as_ref().map(|p| {
        let step = p.current.as_ref().map_or(String::new(), |c| {
            let mut t = format!(", in {}", c.step);
            if c.failures > 0 {
                t += &format!(" ({} failed attempts", c.failures);
                if let Some(e) = &c.last_error {
                    t += &format!(", last: {e}");
                }
                t += ")";
            }
            t
        });
        format!(" [{}: {} phases done{step}]", p.kind, p.phases.len())
    });
    format!(
        "{} {} | mirror: {}{} | {}",
        control::timestamp(s.now_unix_ms, off),
        states.join(", "),
        s.mirror.summary,
        running.unwrap_or_default(),
        s.headline
    )
}

fn operate(
    socket: &PathBuf,
    req: Request,
    timeout_ms: Option<u64>,
    json: bool,
) -> Result<ExitCode, ExitCode> {
    // The daemon answers at the latest when its wait ends; allow for that plus a margin.
    let wait = Duration::from_millis(timeout_ms.unwrap_or(600_000)) + Duration::from_secs(30);
    let mut c = Conn::open(socket, Some(wait))?;
    c.send(&req)?;
    let (raw, reply) = c.recv()?;
    if json {
        println!("{raw}");
    }
    let (outcome, status) = match reply {
        Reply::Outcome { outcome, status } => (outcome, status),
        Reply::Error { kind, message } => return Err(error_exit(kind, &message)),
        other => return Err(fail(EXIT_PROTOCOL, format!("unexpected reply {other:?}"))),
    };
    let off = offset();
    let what = match &req {
        Request::Giveback { .. } => "giveback".to_string(),
        _ => "takeover".to_string(),
    };
    let code = match outcome {
        Outcome::CheckPassed { note } => {
            if !json {
                println!("{what} check passed: {note}");
            }
            EXIT_OK
        }
        Outcome::Refused { refusal, text, .. } => {
            eprintln!("{}: {}", refusal_prefix(refusal.request), text.join("; "));
            EXIT_REFUSED
        }
        Outcome::Accepted { state } => {
            if !json {
                println!(
                    "{what} started: {} is {state:?}; follow it with `takeoverctl watch`",
                    status.node
                );
            }
            EXIT_OK
        }
        Outcome::Completed { state, report } => {
            if !json {
                match report {
                    // Asked at the node taken over: it shut down and the partner serves.
                    Some(r) if r.kind == "shutdown" => {
                        let (total, phases) = timings(&r);
                        println!(
                            "{what} complete: {} is {state:?}, {} serves its aggregates",
                            status.node, status.partner
                        );
                        println!("shutdown took {total}: {}", phases.join(", "));
                    }
                    Some(r) => {
                        let (total, phases) = timings(&r);
                        println!(
                            "{} complete at {} in {total}: {}",
                            r.kind,
                            control::timestamp(
                                r.finished_unix_ms.unwrap_or(status.now_unix_ms),
                                off
                            ),
                            phases.join(", ")
                        );
                    }
                    None => println!("{what} complete: {} is {state:?}", status.node),
                }
                println!("{}", status.headline);
            }
            EXIT_OK
        }
        Outcome::Failed { state, detail } => {
            eprintln!("{what} failed: {} is {state:?}: {detail}", status.node);
            EXIT_FAILED
        }
        Outcome::TimedOut { state, detail } => {
            let detail = if detail.is_empty() {
                String::new()
            } else {
                format!(": {detail}")
            };
            eprintln!("{what} still in progress ({} is {state:?}{detail}) when the wait ended; see `takeoverctl status`", status.node);
            EXIT_TIMED_OUT
        }
    };
    Ok(ExitCode::from(code))
}
