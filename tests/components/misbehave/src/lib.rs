//! Test fixture: echoes each record's value, unless the value is a command to misbehave.
//!
//! | value | what the plugin does |
//! | --- | --- |
//! | `loop` | spins forever |
//! | `alloc` | allocates until memory runs out |
//! | `panic` | panics |
//! | `trap` | executes `unreachable` |
//! | `fail` | fails the whole partition task with a plugin error |
//! | `huge N` | outputs one value of N bytes |
//! | `print TEXT` | writes TEXT to stdout and stderr, then echoes it |
//! | `read-file PATH` | outputs the file's text, or `denied: <error>` |
//! | `connect ADDR` | opens a TCP connection: outputs `connected` or `denied: <error>` |
//! | `env NAME` | outputs the variable's value, or `denied: <error>` |
//! | `to TOPIC TEXT` | outputs TEXT to TOPIC (rather than the job's output topic) |
//! | `clock` | outputs the wall clock (ms since the epoch), the monotonic clock's progress over a spin, and a random number |

use sluice_sdk::{BatchContext, Output, Outputs, PluginError, Record, Reject, Transform};

pub struct Misbehave;

impl Transform for Misbehave {
    type Config = ();

    fn init((): ()) -> Result<Self, PluginError> {
        Ok(Misbehave)
    }

    fn process_batch(
        &mut self,
        ctx: &BatchContext,
        records: Vec<Record>,
    ) -> Result<sluice_sdk::BatchOutput, PluginError> {
        if records.iter().any(|record| record.value.as_deref() == Some(b"fail")) {
            return Err(PluginError::failed("asked to fail the task"));
        }
        let mut out = Outputs::default();
        let mut rejections = Vec::new();
        for record in records {
            let offset = record.offset;
            if let Err(reject) = self.process(ctx, record, &mut out) {
                rejections.push(sluice_sdk::Rejection { offset, reason: reject.reason().to_string() });
            }
        }
        Ok(sluice_sdk::BatchOutput { outputs: out.into_vec(), rejections })
    }

    fn process(&mut self, _ctx: &BatchContext, record: Record, out: &mut Outputs) -> Result<(), Reject> {
        let value = record.value_str()?.to_string();
        let (command, argument) = value.split_once(' ').unwrap_or((value.as_str(), ""));
        let answer = match command {
            "loop" => loop {
                std::hint::black_box(());
            },
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "panic" => panic!("asked to panic at offset {}", record.offset),
            "trap" => std::process::abort(),
            "huge" => "x".repeat(argument.parse()?),
            "print" => {
                println!("{argument}");
                eprintln!("{argument} (stderr)");
                argument.to_string()
            }
            "read-file" => std::fs::read_to_string(argument).unwrap_or_else(|e| format!("denied: {e}")),
            "connect" => match std::net::TcpStream::connect(argument) {
                Ok(_) => "connected".to_string(),
                Err(e) => format!("denied: {e}"),
            },
            "env" => std::env::var(argument).unwrap_or_else(|e| format!("denied: {e}")),
            "clock" => {
                let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                let started = std::time::Instant::now();
                std::hint::black_box((0..100_000u64).sum::<u64>());
                let random = getrandom::u64().map_err(|e| Reject::new(format!("no randomness: {e}")))?;
                format!("clock {} {} {random}", wall.as_millis(), started.elapsed().as_nanos())
            }
            "to" => {
                let (topic, text) = argument.split_once(' ').unwrap_or((argument, ""));
                out.push(Output::new(text.to_string()).to_topic(topic));
                return Ok(());
            }
            _ => value.clone(),
        };
        out.push(Output::new(answer));
        Ok(())
    }
}

sluice_sdk::export_transform!(Misbehave);
