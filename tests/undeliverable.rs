//! Outputs the brokers will not take — larger than their limit, or for a topic the job may not
//! write — are failures of that one output, handled by `--on-failure`: dead-lettered with where
//! they came from while the rest of the batch is delivered once, or the reason the job halts,
//! naming the output. Never a batch that fails the same way on every restart.

use std::time::Duration;

use crate::harness::{self, BrokerProcess, Input, consume, host, offsets, run_host, unique};

const LIMIT: Duration = Duration::from_secs(60);

/// The misbehave fixture over `topic`, outputs to `output`, dead letters to `dead`.
fn job(
    broker: &BrokerProcess,
    topic: &str,
    output: &str,
    dead: &str,
    group: &str,
    policy: &str,
) -> std::process::Command {
    let mut command = host();
    command
        .args(["run", "--plugin", sluice_plugin_artifacts::MISBEHAVE, "--brokers", &broker.brokers, "--topic", topic])
        .args(["--group", group, "--output-topic", output, "--dead-letter-topic", dead, "--on-failure", policy])
        .args(["--auto-offset-reset", "earliest", "--stop-when-caught-up", "--task-retries", "0"]);
    command
}

fn inputs(values: &[&str]) -> Vec<Input> {
    values.iter().map(|value| Input { partition: 0, key: None, value: value.to_string() }).collect()
}

fn values(records: &[harness::Consumed]) -> Vec<String> {
    let mut values: Vec<String> = records.iter().filter_map(|r| r.value.clone()).collect();
    values.sort();
    values
}

#[test]
fn an_output_over_the_size_limit_is_dead_lettered_and_the_rest_delivered_once() {
    let (topic, output, dead) = (unique("big"), unique("big-out"), unique("big-dlq"));
    let broker = BrokerProcess::start(&[(&topic, 1), (&output, 1), (&dead, 1)]);
    harness::produce(&broker.brokers, &topic, &inputs(&["a", "huge 2000000", "b", "c"]));
    let group = unique("big");
    let run = run_host(&mut job(&broker, &topic, &output, &dead, &group, "dead-letter"), LIMIT);
    run.assert_success();
    assert_eq!(values(&consume(&broker.brokers, &output)), ["a", "b", "c"]);
    let letters = consume(&broker.brokers, &dead);
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.headers["sluice-error-kind"].as_deref(), Some("undeliverable"));
    assert!(letter.headers["sluice-error"].as_deref().unwrap().contains("MessageSizeTooLarge"), "{letter:?}");
    assert_eq!(letter.headers["sluice-target"].as_deref(), Some(output.as_str()));
    assert_eq!(letter.headers["sluice-source-offsets"].as_deref(), Some("[0, 4)"));
    // The dead letter itself is too large for the brokers: it goes without its value, saying so.
    assert_eq!(letter.value, None);
    assert!(letter.headers["sluice-value-dropped"].as_deref().unwrap().starts_with("2000000 bytes"), "{letter:?}");
    harness::assert_committed_at_end(&broker.brokers, &topic, &group);
}

#[test]
fn an_output_over_the_size_limit_halts_by_default_naming_the_output_and_the_reason() {
    let (topic, output, dead) = (unique("big"), unique("big-out"), unique("big-dlq"));
    let broker = BrokerProcess::start(&[(&topic, 1), (&output, 1), (&dead, 1)]);
    harness::produce(&broker.brokers, &topic, &inputs(&["a", "huge 2000000"]));
    let group = unique("big");
    let run = run_host(&mut job(&broker, &topic, &output, &dead, &group, "halt"), LIMIT);
    run.assert_error(&[
        &format!("an output of {topic}:0 [0, 2) for topic `{output}` cannot be delivered"),
        "MessageSizeTooLarge",
        "--on-failure halt",
    ]);
    assert!(offsets(&broker.brokers, &topic, &group).values().all(|o| o.committed.is_none()));
    assert!(consume(&broker.brokers, &dead).is_empty());
}

#[test]
fn an_output_for_a_topic_outside_the_allow_list_is_refused_and_dead_lettered() {
    let (topic, output, dead) = (unique("allow"), unique("allow-out"), unique("allow-dlq"));
    let (side, forbidden) = (unique("allowed-side"), unique("forbidden"));
    let broker = BrokerProcess::start(&[(&topic, 1), (&output, 1), (&dead, 1), (&side, 1), (&forbidden, 1)]);
    let to = |target: &str, text: &str| format!("to {target} {text}");
    harness::produce(&broker.brokers, &topic, &inputs(&["a", &to(&forbidden, "secret"), &to(&side, "fine"), "b"]));
    let group = unique("allow");
    let mut command = job(&broker, &topic, &output, &dead, &group, "dead-letter");
    // The job may write its output topic and the side topic, nothing else (the dead-letter
    // topic is the job's own).
    command.args(["--allow-output-topic", &output, "--allow-output-topic", &format!("{}.*", regex_escape(&side))]);
    run_host(&mut command, LIMIT).assert_success();
    assert_eq!(values(&consume(&broker.brokers, &output)), ["a", "b"]);
    assert_eq!(values(&consume(&broker.brokers, &side)), ["fine"]);
    assert!(consume(&broker.brokers, &forbidden).is_empty(), "nothing reached the forbidden topic");
    let letters = consume(&broker.brokers, &dead);
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].value.as_deref(), Some("secret"));
    assert_eq!(letters[0].headers["sluice-target"].as_deref(), Some(forbidden.as_str()));
    assert!(letters[0].headers["sluice-error"].as_deref().unwrap().contains("--allow-output-topic"), "{letters:?}");
    harness::assert_committed_at_end(&broker.brokers, &topic, &group);
}

fn regex_escape(text: &str) -> String {
    text.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c.to_string() } else { format!("\\{c}") }).collect()
}
