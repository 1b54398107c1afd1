//! Property tests for the parsers at Kiln's edges: whatever an outsider
//! sends — a rows body, a Clay callback, a `?timeout=` value, an
//! Authorization header, a lease request body — the parser answers with a
//! value or a refusal, never a panic, and what it accepts is within bounds.
//! A failing case proptest finds is saved in its regressions file (commit
//! it) and replayed first on every later run.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, header};
use proptest::prelude::*;

use kiln::dataplane::direct::{MAX_SYNC_TIMEOUT, requested_wait};
use kiln::dataplane::receiver::{callback_of_body, rows_of_body};
use kiln::ledger::{LeaseRequest, MAX_AMOUNT, validate};

/// Cases per property: 2,000 in `cargo test`; `.ci/run` runs a deeper pass
/// with KILN_FUZZ_CASES.
fn cases() -> u32 {
    std::env::var("KILN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// JSON-ish text: mostly valid JSON of rows, sometimes broken.
fn json_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| format!("{n}")),
        "\\PC{0,12}".prop_map(|s| serde_json::to_string(&s).unwrap()),
    ];
    let value = leaf.prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec(("(kiln_row_id|email|domain|\\PC{0,6})", inner), 0..6).prop_map(
                |fields| {
                    let fields: Vec<String> = fields
                        .into_iter()
                        .map(|(k, v)| format!("{}:{v}", serde_json::to_string(&k).unwrap()))
                        .collect();
                    format!("{{{}}}", fields.join(","))
                }
            ),
        ]
    });
    prop_oneof![value, "\\PC{0,60}"]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn any_rows_body_is_one_to_max_objects_or_a_refusal(text in json_text(), max in 1usize..20) {
        if let Some((rows, batch)) = rows_of_body(text.as_bytes(), max) {
            prop_assert!(!rows.is_empty() && rows.len() <= max);
            prop_assert!(rows.iter().all(serde_json::Value::is_object));
            prop_assert!(batch || rows.len() == 1);
        }
    }

    #[test]
    fn any_callback_body_names_a_row_or_is_refused(text in json_text()) {
        if let Ok((row_id, result)) = callback_of_body(text.as_bytes()) {
            prop_assert!(!row_id.is_empty());
            prop_assert_eq!(result["kiln_row_id"].as_str(), Some(row_id.as_str()));
        }
    }

    #[test]
    fn any_bytes_as_rows_or_callback_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = rows_of_body(&bytes, 1000);
        let _ = callback_of_body(&bytes);
    }

    #[test]
    fn any_timeout_text_is_a_capped_wait_or_a_refusal(text in "\\PC{0,40}") {
        if let Ok(wait) = requested_wait(Some(&text), Duration::from_secs(30)) {
            prop_assert!(wait <= MAX_SYNC_TIMEOUT);
            prop_assert!(text.ends_with('s') || text.ends_with('m') || text.ends_with('h'));
        }
    }

    #[test]
    fn timeouts_that_look_almost_right_never_panic(
        number in "[-+0-9.]{0,25}",
        unit in "(ms|s|m|h|us|ns|d|)"
    ) {
        let text = format!("{number}{unit}");
        let _ = requested_wait(Some(&text), Duration::from_secs(30));
    }

    #[test]
    fn any_authorization_header_gives_a_non_empty_token_or_none(value in "[ -~]{0,80}") {
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(header::AUTHORIZATION, value);
        }
        if let Some(token) = kiln::http::bearer_token(&headers) {
            prop_assert!(!token.is_empty());
            prop_assert!(value.to_ascii_lowercase().starts_with("bearer "));
        }
    }

    #[test]
    fn any_json_body_is_a_valid_lease_request_or_a_refusal(
        data in prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(-1.0), Just(1e300), 0.0..2e9f64],
        actions in any::<u64>(),
        seq in any::<u64>(),
        failures in any::<u64>(),
        lease in "\\PC{0,300}",
    ) {
        let request = LeaseRequest {
            namespace: "sales".into(),
            budget: "team".into(),
            table: "leads".into(),
            holder: "pod".into(),
            lease,
            seq,
            spent: kiln::api::table::CreditCost { data_credits: data, actions },
            failures,
            ttl_seconds: 60,
            ..Default::default()
        };
        if validate(&request).is_ok() {
            prop_assert!(request.spent.data_credits.is_finite());
            prop_assert!((0.0..=MAX_AMOUNT).contains(&request.spent.data_credits));
            prop_assert!(request.spent.actions as f64 <= MAX_AMOUNT);
            prop_assert!(request.seq >= 1 && request.failures <= kiln::ledger::MAX_CALLS);
            prop_assert!(!request.lease.is_empty() && request.lease.len() <= kiln::ledger::MAX_NAME_BYTES);
        }
    }

    #[test]
    fn arbitrary_bytes_never_parse_into_an_unchecked_request(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        // The lease API parses, then validates: either step may refuse.
        if let Ok(request) = serde_json::from_slice::<LeaseRequest>(&body)
            && validate(&request).is_ok()
        {
            for amount in [&request.ask, &request.spent, &request.refund, &request.give_back, &request.extra] {
                prop_assert!(amount.data_credits.is_finite() && amount.data_credits >= 0.0);
                prop_assert!(amount.data_credits <= MAX_AMOUNT);
            }
        }
    }
}
