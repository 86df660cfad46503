//! `application/x-www-form-urlencoded` bodies and query strings.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(params) = flexbridge_ingress::form::parse(data) {
        // What was decoded encodes back to something that decodes the same.
        let encoded = flexbridge_ingress::form::encode(&params);
        let again = flexbridge_ingress::form::parse(encoded.as_bytes()).expect("re-encoded form");
        assert_eq!(again, params);
    }
});
