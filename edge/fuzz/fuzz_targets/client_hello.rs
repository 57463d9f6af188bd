//! Fuzzes the ClientHello parser: it must never panic, must only answer valid normalized
//! names, and must answer consistently as more bytes arrive (a final answer on a prefix is
//! the final answer for the whole input, and bytes after a final answer change nothing).

#![no_main]

use edgible_edge::sni::{ServerName, SniError, parse_client_hello};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = parse_client_hello(data);
    if let Ok(Some(name)) = &whole {
        assert_eq!(ServerName::parse(name.as_str().as_bytes()).as_ref(), Ok(name));
        assert!(!name.as_str().bytes().any(|byte| byte.is_ascii_uppercase()));
    }

    let derived = data.first().map_or(0, |byte| usize::from(*byte) * data.len() / 256);
    for cut in [derived, data.len() / 2, data.len().saturating_sub(1)] {
        let Some(prefix) = data.get(..cut) else { continue };
        match (parse_client_hello(prefix), &whole) {
            (Err(SniError::Incomplete { needed }), Ok(_)) => assert!(needed >= 1 && cut + needed <= data.len()),
            (Err(SniError::Incomplete { needed }), Err(SniError::Incomplete { needed: needed_whole })) => {
                assert!(needed >= 1 && cut + needed <= data.len() + needed_whole)
            }
            (Err(SniError::Incomplete { needed }), Err(_)) => assert!(needed >= 1),
            (prefix, whole) => assert_eq!(&prefix, whole, "a prefix of {cut} bytes answered differently"),
        }
    }

    if !whole.as_ref().is_err_and(SniError::is_incomplete) {
        let mut extended = data.to_vec();
        extended.extend_from_slice(&[22, 3, 1, 0, 1, 1]);
        assert_eq!(parse_client_hello(&extended), whole);
    }
});
