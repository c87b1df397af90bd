//! The wire format: one line of JSON per request, one line of JSON per response.

use serde::{Deserialize, Serialize};

use super::Snapshot;
use crate::config::LoanPolicy;

/// Longest request line the server reads (newline included). Requests are a few dozen
/// bytes; a longer line is malformed, answered with an error and its connection closed,
/// so a client can never make the server buffer more than this.
pub const MAX_REQUEST_BYTES: usize = 4096;

/// Longest response line a client reads. A snapshot is about 1 KiB per partition; this
/// bounds what a client buffers should the other end not be amsvm.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// Longest client-supplied text echoed back in an error message.
const MAX_ECHO: usize = 64;

/// A request a client can send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The counters of the pool and of every partition.
    Stat,
    /// Hold a partition's balloon target (`{"cmd":"loan","partition":"p0","mib":64}`),
    /// or give it back to the pool's loaning policy (`"mib":"auto"`).
    Loan { partition: String, target: LoanTarget },
    /// Fault injection (tests, demos): end the paging-server VM now; amsvm restarts it.
    KillPagingServer,
    /// Change a partition's weight and/or loan policy while it runs
    /// (`{"cmd":"set","partition":"p0","weight":200,"loan_policy":"aggressive"}`).
    Set { partition: String, weight: Option<u8>, loan_policy: Option<LoanPolicy> },
    /// End a partition now; its memory and paging device go back to the pool
    /// (`{"cmd":"destroy","partition":"p0"}`).
    Destroy { partition: String },
    /// Resume a partition the pool paused on a paging-device error, once the device
    /// works again (`{"cmd":"resume","partition":"p0"}`).
    Resume { partition: String },
}

/// The target of a `loan` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoanTarget {
    /// The pool's loaning policy decides.
    Auto,
    /// Held at this many MiB until set again.
    Mib(u64),
}

/// Command names, for messages.
const COMMANDS: [&str; 6] = ["stat", "loan", "set", "destroy", "resume", "kill-paging-server"];

impl Request {
    /// Parse one request line (without its newline). The error is the message sent back.
    pub fn parse(line: &[u8]) -> Result<Request, String> {
        let v: serde_json::Value = serde_json::from_slice(line).map_err(|e| format!("request is not JSON: {e}"))?;
        let obj = v.as_object().ok_or_else(|| "request must be a JSON object such as {\"cmd\":\"stat\"}".to_string())?;
        let cmd = match obj.get("cmd") {
            Some(serde_json::Value::String(s)) => s,
            Some(_) => return Err("request field \"cmd\" must be a string".to_string()),
            None => return Err("request has no \"cmd\" field".to_string()),
        };
        match cmd.as_str() {
            "stat" => Ok(Request::Stat),
            "kill-paging-server" => Ok(Request::KillPagingServer),
            "destroy" => Ok(Request::Destroy { partition: partition(obj, "destroy")? }),
            "resume" => Ok(Request::Resume { partition: partition(obj, "resume")? }),
            "loan" => {
                let partition = partition(obj, "loan")?;
                let target = match obj.get("mib") {
                    Some(serde_json::Value::String(s)) if s == "auto" => LoanTarget::Auto,
                    Some(v) => match v.as_u64() {
                        Some(m) if m <= 1 << 30 => LoanTarget::Mib(m),
                        _ => return Err(format!("loan: \"mib\" must be a number of MiB or \"auto\", not {}", echo(&v.to_string()))),
                    },
                    None => return Err("loan: \"mib\" is missing (a number of MiB or \"auto\")".to_string()),
                };
                Ok(Request::Loan { partition, target })
            }
            "set" => {
                let partition = partition(obj, "set")?;
                let weight = match obj.get("weight") {
                    None => None,
                    Some(v) => match v.as_u64() {
                        Some(w) if w <= 255 => Some(w as u8),
                        _ => return Err(format!("set: \"weight\" must be a number 0-255, not {}", echo(&v.to_string()))),
                    },
                };
                let loan_policy = match obj.get("loan_policy") {
                    None => None,
                    Some(v) => match v.as_str().and_then(|s| s.parse().ok()) {
                        Some(p) => Some(p),
                        None => {
                            return Err(format!(
                                "set: \"loan_policy\" must be \"off\", \"default\" or \"aggressive\", not {}",
                                echo(&v.to_string())
                            ))
                        }
                    },
                };
                if weight.is_none() && loan_policy.is_none() {
                    return Err("set: give \"weight\" and/or \"loan_policy\"".to_string());
                }
                Ok(Request::Set { partition, weight, loan_policy })
            }
            _ => Err(format!("unknown cmd {:?} (known: {})", echo(cmd), COMMANDS.join(", "))),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Request::Stat => "stat",
            Request::Loan { .. } => "loan",
            Request::KillPagingServer => "kill-paging-server",
            Request::Set { .. } => "set",
            Request::Destroy { .. } => "destroy",
            Request::Resume { .. } => "resume",
        }
    }

    /// The request as sent on the wire, newline included.
    pub fn to_line(&self) -> String {
        let v = match self {
            Request::Stat => serde_json::json!({ "cmd": "stat" }),
            Request::KillPagingServer => serde_json::json!({ "cmd": "kill-paging-server" }),
            Request::Destroy { partition } => serde_json::json!({ "cmd": "destroy", "partition": partition }),
            Request::Resume { partition } => serde_json::json!({ "cmd": "resume", "partition": partition }),
            Request::Set { partition, weight, loan_policy } => {
                let mut v = serde_json::json!({ "cmd": "set", "partition": partition });
                if let Some(w) = weight {
                    v["weight"] = serde_json::json!(w);
                }
                if let Some(p) = loan_policy {
                    v["loan_policy"] = serde_json::json!(p.to_string());
                }
                v
            }
            Request::Loan { partition, target } => serde_json::json!({
                "cmd": "loan",
                "partition": partition,
                "mib": match target {
                    LoanTarget::Auto => serde_json::json!("auto"),
                    LoanTarget::Mib(m) => serde_json::json!(m),
                },
            }),
        };
        format!("{v}\n")
    }
}

/// The `"partition"` field of a `cmd` request.
fn partition(obj: &serde_json::Map<String, serde_json::Value>, cmd: &str) -> Result<String, String> {
    match obj.get("partition") {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        _ => Err(format!("{cmd}: \"partition\" must be a partition name")),
    }
}

/// A client-supplied string cut to a length fit for an error message.
fn echo(s: &str) -> String {
    match s.char_indices().nth(MAX_ECHO) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// One response line: `{"ok":true,"stat":{...}}` or `{"ok":false,"error":"..."}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stat: Option<Snapshot>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn stat(s: Snapshot) -> Response {
        Response { ok: true, stat: Some(s), error: None }
    }

    /// A request that changed something and has nothing to report.
    pub fn done() -> Response {
        Response { ok: true, stat: None, error: None }
    }

    pub fn error(msg: impl Into<String>) -> Response {
        Response { ok: false, stat: None, error: Some(msg.into()) }
    }

    /// The response as sent on the wire, newline included.
    pub fn to_line(&self) -> String {
        // Serializing plain structs of numbers and strings into a String cannot fail.
        let mut s = serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":{:?}}}", e.to_string()));
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests_and_names_errors() {
        assert_eq!(Request::parse(br#"{"cmd":"stat"}"#), Ok(Request::Stat));
        assert_eq!(Request::parse(br#" {"cmd" : "stat", "extra": 1} "#), Ok(Request::Stat));
        assert!(Request::parse(b"stat").unwrap_err().starts_with("request is not JSON"));
        assert!(Request::parse(b"[1]").unwrap_err().contains("JSON object"));
        assert!(Request::parse(b"{}").unwrap_err().contains("no \"cmd\""));
        assert!(Request::parse(br#"{"cmd":7}"#).unwrap_err().contains("must be a string"));
        let e = Request::parse(br#"{"cmd":"frobnicate"}"#).unwrap_err();
        assert_eq!(e, "unknown cmd \"frobnicate\" (known: stat, loan, set, destroy, resume, kill-paging-server)");
        let long = format!(r#"{{"cmd":"{}"}}"#, "x".repeat(1000));
        assert!(Request::parse(long.as_bytes()).unwrap_err().len() < 200);
        assert!(Request::parse(&[0xff, 0xfe]).is_err());
        assert_eq!(Request::Stat.to_line(), "{\"cmd\":\"stat\"}\n");
        let loan = Request::Loan { partition: "p0".into(), target: LoanTarget::Mib(64) };
        assert_eq!(Request::parse(loan.to_line().trim_end().as_bytes()), Ok(loan));
        let auto = Request::Loan { partition: "p0".into(), target: LoanTarget::Auto };
        assert_eq!(Request::parse(auto.to_line().trim_end().as_bytes()), Ok(auto));
        for bad in [r#"{"cmd":"loan","mib":3}"#, r#"{"cmd":"loan","partition":"a"}"#, r#"{"cmd":"loan","partition":"a","mib":-1}"#, r#"{"cmd":"loan","partition":"a","mib":"lots"}"#] {
            assert!(Request::parse(bad.as_bytes()).unwrap_err().starts_with("loan: "), "{bad}");
        }
        for r in [Request::Destroy { partition: "p1".into() }, Request::Resume { partition: "p2".into() }] {
            assert_eq!(Request::parse(r.to_line().trim_end().as_bytes()), Ok(r));
        }
        assert_eq!(Request::parse(br#"{"cmd":"destroy"}"#).unwrap_err(), "destroy: \"partition\" must be a partition name");
        assert_eq!(Request::parse(br#"{"cmd":"resume","partition":3}"#).unwrap_err(), "resume: \"partition\" must be a partition name");
        let set = Request::Set { partition: "p0".into(), weight: Some(200), loan_policy: Some(LoanPolicy::Aggressive) };
        assert_eq!(Request::parse(set.to_line().trim_end().as_bytes()), Ok(set));
        let w = Request::Set { partition: "p0".into(), weight: Some(0), loan_policy: None };
        assert_eq!(Request::parse(w.to_line().trim_end().as_bytes()), Ok(w));
        for (bad, why) in [
            (r#"{"cmd":"set","partition":"a"}"#, "weight\" and/or"),
            (r#"{"cmd":"set","weight":3}"#, "partition"),
            (r#"{"cmd":"set","partition":"a","weight":256}"#, "0-255, not 256"),
            (r#"{"cmd":"set","partition":"a","weight":"heavy"}"#, "0-255"),
            (r#"{"cmd":"set","partition":"a","loan_policy":"lavish"}"#, "not \"lavish\""),
        ] {
            let e = Request::parse(bad.as_bytes()).unwrap_err();
            assert!(e.starts_with("set: ") && e.contains(why), "{bad}: {e}");
        }
    }
}
