//! The parsers of input and feedback records: any payload and key give a record within every
//! field's limit, or one dead letter of bounded size that is valid JSON; never a panic.
#![no_main]

use dlpipe_records::{Feedback, ImageRecord, MAX_ID_BYTES, MAX_LABEL_BYTES, MAX_URI_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte says how much of the rest is the message key (0: none).
    let Some((&key_len, rest)) = data.split_first() else { return };
    let key_len = (key_len as usize).min(rest.len());
    let (key, payload) = rest.split_at(key_len);
    let key = (key_len > 0).then_some(key);
    match ImageRecord::parse(Some(payload), key, 3, 17, Some(0)) {
        Ok(record) => {
            assert!(record.id.len() <= MAX_ID_BYTES && record.uri.len() <= MAX_URI_BYTES);
            assert!(!record.uri.trim().is_empty());
            assert!(record.label.as_ref().is_none_or(|l| l.len() <= MAX_LABEL_BYTES && !l.trim().is_empty()));
        }
        Err(letter) => bounded_json(&letter.to_json()),
    }
    match Feedback::parse(Some(payload), key, 3, 17, Some(0)) {
        Ok(feedback) => {
            assert!(feedback.id.len() <= MAX_ID_BYTES);
            assert!(feedback.label.len() <= MAX_LABEL_BYTES && !feedback.label.trim().is_empty());
        }
        Err(letter) => bounded_json(&letter.to_json()),
    }
});

fn bounded_json(json: &str) {
    assert!(json.len() < 16 * 1024, "a dead letter of {} bytes", json.len());
    assert!(serde_json::from_str::<serde_json::Value>(json).is_ok(), "a dead letter that is not JSON: {json}");
}
