//! The benchmark's inputs, generated deterministically, and the results they must give.

use std::collections::HashMap;

/// The field marker of the seeds' access log.
const MARK: &str = "<<<!>>>";

/// Every `MALFORMED_EVERY`th ETL line has a field missing, so rejections are part of the work.
const MALFORMED_EVERY: u64 = 100;

/// The `n`th line of the seeds' online-ETL access log (seed 003, 4.3.3): 15 marked fields,
/// about 300 bytes, like the seeds' sample line. Some lines are malformed (see [`etl_valid`]).
pub fn etl_line(n: u64) -> String {
    let second = 1_541_942_942 + n * 7;
    let (days, rest) = (second / 86_400, second % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    let time = format!("{year:04}{month:02}{day:02}{:02}{:02}{:02}", rest / 3600, rest / 60 % 60, rest % 60);
    let mut fields = vec![
        (3_000_000 + n).to_string(),
        (n % 9_973).to_string(),
        time,
        format!("58.{}.{}.{}", n % 223, n / 223 % 250, n % 250),
        format!("202.102.{}.{}", n % 97, n % 251),
        (1024 + n % 60_000).to_string(),
        "80".to_string(),
        "www.sumecjob.com".to_string(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        format!("http://www.sumecjob.com/Social.aspx?page={}&session={:x}", n % 1_000, n.wrapping_mul(0x9e37_79b9)),
        (2_556_928_066 + n).to_string(),
    ];
    if !etl_valid(n) {
        fields.remove(7);
    }
    fields.iter().map(|field| format!("{MARK}{field}{MARK}")).collect::<Vec<_>>().join(",")
}

/// Whether the ETL plugin accepts line `n`.
pub fn etl_valid(n: u64) -> bool {
    n % MALFORMED_EVERY != MALFORMED_EVERY - 1
}

/// How many of the first `count` lines are valid.
pub fn etl_valid_count(count: u64) -> u64 {
    count - count / MALFORMED_EVERY
}

/// Year, month and day of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// Words per word-count line.
pub const WORDS_PER_LINE: u64 = 8;

/// The `n`th word-count line: [`WORDS_PER_LINE`] words drawn from a vocabulary of
/// `vocabulary` words. The first lines name every word once, so the state holds exactly
/// `vocabulary` keys once `vocabulary / WORDS_PER_LINE` lines are in.
pub fn word_line(n: u64, vocabulary: u64) -> String {
    let words: Vec<String> = (0..WORDS_PER_LINE)
        .map(|i| {
            let slot = n * WORDS_PER_LINE + i;
            let word = if slot < vocabulary { slot } else { mix(slot) % vocabulary };
            format!("w{word}")
        })
        .collect();
    words.join(" ")
}

/// Every word's count over the first `lines` lines: what the state must hold at the end.
pub fn word_counts(lines: u64, vocabulary: u64) -> HashMap<String, u64> {
    let mut counts = HashMap::new();
    for n in 0..lines {
        for word in word_line(n, vocabulary).split_whitespace() {
            *counts.entry(word.to_string()).or_insert(0) += 1;
        }
    }
    counts
}

/// SplitMix64: a fixed, well-spread sequence without a dependency.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etl_lines_look_like_the_seeds_sample() {
        let line = etl_line(0);
        assert_eq!(line.split(',').count(), 15);
        assert!(line.contains("<<<!>>>20181111132902<<<!>>>"), "{line}");
        assert_eq!(etl_line(99).split(',').count(), 14);
        assert_eq!(etl_valid_count(250), 248);
    }

    #[test]
    fn the_word_lines_name_the_whole_vocabulary() {
        let counts = word_counts(200, 1_000);
        assert_eq!(counts.len(), 1_000);
        assert_eq!(counts.values().sum::<u64>(), 200 * WORDS_PER_LINE);
    }
}
