//! Property-based fuzzing of what users control: the job-file parser and the
//! control protocol.  `make test` runs a few hundred cases of each in
//! seconds; `PROPTEST_CASES=100000 cargo test --release -p mezod-core --test
//! fuzz` runs a longer campaign (failures are saved under
//! `core/proptest-regressions/` and replayed first).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use mezod_core::daemon::control::{request, serve, Call, Limits, Request, Response};
use mezod_core::spec::JobSpec;
use proptest::prelude::*;

/// `PROPTEST_CASES` when set (a longer campaign), else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A valid job file, for mutation.
const JOB: &str = "model: {path: /m, dtype: f32, threads: 1}\n\
task: {kind: classification, template: sst2, label_words: {\"0\": \" terrible\", \"1\": \" great\"}}\n\
data: {train: /d/train.jsonl, dev: /d/dev.jsonl, max_dev: 16}\n\
mezo: {steps: 100, batch_size: 8, lr: 1.0e-6, eps: 1.0e-3, seed: 7}\n";

/// Text made of YAML's own characters and words, which reaches deeper into
/// the parser than uniform bytes do.
fn yamlish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("[".to_string()),
        Just("]".to_string()),
        Just("{".to_string()),
        Just("}".to_string()),
        Just(": ".to_string()),
        Just(", ".to_string()),
        Just("\n".to_string()),
        Just("  ".to_string()),
        Just("- ".to_string()),
        Just("&a ".to_string()),
        Just("*a".to_string()),
        Just("'".to_string()),
        Just("\"".to_string()),
        Just("# ".to_string()),
        Just("!!binary ".to_string()),
        Just("model".to_string()),
        Just("mezo".to_string()),
        Just("steps".to_string()),
        "[a-z_]{1,8}",
        "-?[0-9]{1,25}(\\.[0-9]+)?(e[+-]?[0-9]{1,4})?",
        any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(piece, 0..200).prop_map(|v| v.concat())
}

/// A valid job file with bytes deleted, inserted or replaced.
fn mutated_job() -> impl Strategy<Value = String> {
    prop::collection::vec((0..JOB.len(), 0u8..3, any::<char>()), 1..8).prop_map(|edits| {
        let mut chars: Vec<char> = JOB.chars().collect();
        for (at, kind, c) in edits {
            let at = at.min(chars.len().saturating_sub(1));
            match kind {
                0 if !chars.is_empty() => {
                    chars.remove(at);
                }
                1 => chars.insert(at, c),
                _ if !chars.is_empty() => chars[at] = c,
                _ => {}
            }
        }
        chars.into_iter().collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(2000), ..ProptestConfig::default() })]

    /// Any text is parsed or refused with a message, quickly; never a panic.
    #[test]
    fn the_job_parser_refuses_or_accepts_any_text(text in prop_oneof![yamlish(), mutated_job(), ".{0,400}"]) {
        let t = Instant::now();
        match JobSpec::parse_with_base(&text, None) {
            Ok(spec) => prop_assert!(spec.mezo.steps > 0),
            Err(e) => {
                let message = format!("{e:#}");
                prop_assert!(!message.is_empty());
            }
        }
        prop_assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
    }
}

/// A server whose main loop answers every call with what it was asked.
fn echo_server() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz.sock");
    let limits = Limits {
        connections: 8,
        request_bytes: 4096,
        read_timeout: Duration::from_millis(500),
        answer_timeout: Duration::from_secs(5),
        ..Limits::default()
    };
    serve(UnixListener::bind(&path).unwrap(), limits, |call: Call| {
        let _ = call
            .reply
            .send(Response::Error(format!("{:?}", call.request)));
    })
    .unwrap();
    (dir, path)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(1000), ..ProptestConfig::default() })]

    /// Any bytes on the socket get exactly one answer line: the request as
    /// understood, or why it was refused; and the server goes on serving.
    #[test]
    fn the_control_socket_answers_any_bytes_with_one_line(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..6000),
            "\\{\"[a-z]{1,8}\":\\{\"(id|name|offset|finished)\":(-?[0-9]{1,22}|\"[^\"]{0,20}\"|null|\\[\\])\\}\\}"
                .prop_map(String::into_bytes),
        ],
        newline in any::<bool>(),
    ) {
        static SERVER: std::sync::OnceLock<(tempfile::TempDir, std::path::PathBuf)> = std::sync::OnceLock::new();
        let (_, path) = SERVER.get_or_init(echo_server);
        let mut c = UnixStream::connect(path).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // The server may answer (and close) before reading everything.
        let _ = c.write_all(&bytes);
        if newline {
            let _ = c.write_all(b"\n");
        }
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut answer = String::new();
        BufReader::new(&c).read_line(&mut answer).unwrap();
        let response: Response = serde_json::from_str(&answer)
            .map_err(|e| TestCaseError::fail(format!("{e}: {answer:?}")))?;
        if let Response::Error(what) = &response {
            prop_assert!(!what.is_empty());
        } else {
            prop_assert!(false, "the echo server only sends errors: {response:?}");
        }
        // Still serving.
        let hello = request(path, &Request::Hello).unwrap();
        prop_assert!(matches!(hello, Response::Error(s) if s == "Hello"));
    }
}
