//! Detector corpus: true positives (found exactly, by the right detector, with every detector
//! on) and false positives (not found by that detector).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use tollgate_mask::{find, Detector, DetectorSet};

/// Each input must yield exactly one match, `expected`, attributed to `d`, with all detectors on.
fn true_positives(d: Detector, cases: &[(&str, &str)]) {
    for (input, expected) in cases {
        let got: Vec<_> = find(DetectorSet::all(), input.as_bytes())
            .into_iter()
            .map(|m| (m.detector, &input[m.range]))
            .collect();
        assert_eq!(got, vec![(d, *expected)], "input {input:?}");
    }
}

fn false_positives(d: Detector, cases: &[&str]) {
    for input in cases {
        let got = find(DetectorSet::EMPTY.with(d), input.as_bytes());
        assert!(
            got.is_empty(),
            "{d} fired on {input:?}: {:?}",
            got.iter()
                .map(|m| &input[m.range.clone()])
                .collect::<Vec<_>>()
        );
    }
}

fn same(cases: &[&'static str]) -> Vec<(&'static str, &'static str)> {
    cases.iter().map(|c| (*c, *c)).collect()
}

#[test]
fn email() {
    let mut tp = same(&[
        "jane@example.com",
        "john.doe+tag@mail.example.co.uk",
        "a_b-c%d@sub-domain.example.org",
        "UPPER@EXAMPLE.COM",
        "x@y.io",
        "first.last@xn--bcher-kva.example",
        "123@numbers.net",
        "o'neil@example.ie",
    ]);
    tp.pop(); // an apostrophe is not part of a local part here: checked below
    tp.extend([
        ("contact: bob@example.com.", "bob@example.com"),
        ("<alice@example.com>", "alice@example.com"),
        ("mailto:carol@example.com?subject=hi", "carol@example.com"),
        ("\"dave@example.net\"", "dave@example.net"),
        (
            "Key (email)=(erin@example.org) already exists.",
            "erin@example.org",
        ),
        ("o'neil@example.ie", "neil@example.ie"),
        ("user_john@example.com", "user_john@example.com"),
        ("..lead@example.com", "lead@example.com"),
        ("émile@example.fr", "mile@example.fr"),
    ]);
    true_positives(Detector::Email, &tp);
    false_positives(
        Detector::Email,
        &[
            "user@localhost",
            "@example.com",
            "foo@bar",
            "a@b.c",
            "a@1.2.3.4",
            "user@-example.com",
            "name@example.123",
            "price @ 10.00",
            "a@.com",
            "@@",
            "trailing.@example.com",
            "user@example.com-",
            "plain text without at signs",
            "x@y_z.com",
            &format!("{}@example.com", "a".repeat(65)),
        ],
    );
}

#[test]
fn credit_card() {
    let mut tp = same(&[
        "4111111111111111",
        "4242424242424242",
        "4012888888881881",
        "4222222222222",
        "5555555555554444",
        "5105105105105100",
        "2223003122003222",
        "378282246310005",
        "371449635398431",
        "6011111111111117",
        "6011000990139424",
        "3530111333300000",
        "3566002020360505",
        "30569309025904",
        "38520000023237",
        "6200000000000005",
        "4242 4242 4242 4242",
        "4242-4242-4242-4242",
        "3782 822463 10005",
    ]);
    tp.extend([
        (
            "card: 4111 1111 1111 1111, exp 12/29",
            "4111 1111 1111 1111",
        ),
        ("(5555555555554444)", "5555555555554444"),
        ("id-4111111111111111", "4111111111111111"),
    ]);
    true_positives(Detector::CreditCard, &tp);
    false_positives(
        Detector::CreditCard,
        &[
            "4111111111111112",     // Luhn
            "4242424242424241",     // Luhn
            "5555555555554445",     // Luhn
            "1234567812345670",     // Luhn-valid, no issuer starts with 1
            "0000000000000000",     // Luhn-valid zeros
            "9999999999999995",     // no issuer
            "41111111111111111111", // 20 digits
            "411111111111",         // 12 digits
            "0.4111111111111111",   // a decimal
            "3.4111111111111111e10",
            "order 4111111111111111999",
            "A4111111111111111", // glued to a word
            "4111111111111111x",
            "4111 1111 1111 111",      // 15 digits Visa
            "4242 4242-4242 4242",     // mixed separators
            "41 11 11 11 11 11 11 11", // groups too short
            "1700000000000",
            "timestamp 1717171717171",
        ],
    );
}

#[test]
fn us_ssn() {
    let mut tp = same(&[
        "078-05-1120",
        "123-45-6789",
        "219-09-9999",
        "001-01-0001",
        "665-12-3456",
        "667-12-3456",
        "899-99-9999",
        "123 45 6789",
        "536-22-1234",
        "772-10-2023",
    ]);
    tp.extend([
        ("SSN: 123-45-6789.", "123-45-6789"),
        ("ssn=(123-45-6789)", "123-45-6789"),
        ("\"078-05-1120\"", "078-05-1120"),
        ("a 234-56-7890 b", "234-56-7890"),
        ("x/345-67-8901", "345-67-8901"),
    ]);
    true_positives(Detector::UsSsn, &tp);
    false_positives(
        Detector::UsSsn,
        &[
            "000-12-3456",
            "666-12-3456",
            "900-12-3456",
            "999-99-9999",
            "950-12-3456",
            "123-00-4567",
            "123-45-0000",
            "123456789",
            "123-45-67890",
            "1123-45-6789",
            "2024-01-15",
            "12-345-6789",
            "123-45-6789-1",
            "123-45 6789",
            "555-123-45-6789",
            "1.123-45-6789",
            "A123-45-6789",
        ],
    );
}

#[test]
fn iban() {
    let mut tp = same(&[
        "GB82WEST12345698765432",
        "DE89370400440532013000",
        "FR1420041010050500013M02606",
        "NL91ABNA0417164300",
        "ES9121000418450200051332",
        "IT60X0542811101000000123456",
        "BE68539007547034",
        "CH9300762011623852957",
        "AT611904300234573201",
        "NO9386011117947",
        "PL61109010140000071219812874",
        "SE4550000000058398257466",
        "DK5000400440116243",
        "FI2112345600000785",
        "IE29AIBK93115212345678",
        "PT50000201231234567890154",
        "DE89 3704 0044 0532 0130 00",
        "GB82 WEST 1234 5698 7654 32",
    ]);
    tp.push((
        "IBAN: DE89 3704 0044 0532 0130 00.",
        "DE89 3704 0044 0532 0130 00",
    ));
    true_positives(Detector::Iban, &tp);
    false_positives(
        Detector::Iban,
        &[
            "GB83WEST12345698765432",      // check digits
            "DE88370400440532013000",      // check digits
            "DE8937040044053201300",       // too short for DE
            "DE893704004405320130001",     // too long for DE
            "XX89370400440532013000",      // no such country
            "NL91ABNA0417164301",          // checksum
            "de89370400440532013000",      // lowercase country
            "GB82WEST1234569876543X",      // checksum
            "DE89 370 4004 4053 2013 000", // grouping
            "ADE89370400440532013000",     // glued
            "US12345678901234567890",
            "AB12",
            "GB82 WEST 1234 5698 7654",
            "BE68539007547035",
            "NO9386011117948",
        ],
    );
}

#[test]
fn phone() {
    let mut tp = same(&[
        "+1 415 555 2671",
        "+14155552671",
        "+44 20 7946 0958",
        "+33 6 12 34 56 78",
        "+49-30-901820",
        "(415) 555-2671",
        "415-555-2671",
        "415.555.2671",
        "1-800-555-0199",
        "020 7946 0958",
        "06 12 34 56 78",
        "+81 3-1234-5678",
        "+61 2 9374 4000",
        "+1 (415) 555-2671",
        "(212)555-1234",
        "030 1234 5678",
    ]);
    tp.push(("call me at +44 20 7946 0958, thanks", "+44 20 7946 0958"));
    tp.push(("tel:+14155552671", "+14155552671"));
    true_positives(Detector::Phone, &tp);
    false_positives(
        Detector::Phone,
        &[
            "4155552671",
            "123-456-7890",
            "415-155-2671",
            "+0 123 456 789",
            "+1 415 555 267",
            "2024-01-15",
            "12:30:45",
            "1.2.3.4",
            "+123",
            "555-1234",
            "x+14155552671",
            "v415-555-2671",
            "ISBN 978-3-16-148410-0",
            "+1234567890123456",
            "00 12 34 56 78",
            "3.14159 2.71828",
        ],
    );
}

#[test]
fn ipv4() {
    let mut tp = same(&[
        "192.168.1.1",
        "10.0.0.1",
        "8.8.8.8",
        "255.255.255.255",
        "0.0.0.0",
        "172.16.254.3",
        "1.2.3.4",
    ]);
    tp.extend([
        ("addr=10.1.2.3:5432", "10.1.2.3"),
        ("(127.0.0.1)", "127.0.0.1"),
        ("203.0.113.7/24", "203.0.113.7"),
        ("from 198.51.100.20.", "198.51.100.20"),
        ("host 100.64.0.1, port", "100.64.0.1"),
    ]);
    true_positives(Detector::Ipv4, &tp);
    false_positives(
        Detector::Ipv4,
        &[
            "256.1.1.1",
            "1.2.3",
            "1.2.3.4.5",
            "v1.2.3.4",
            "01.02.03.04",
            "192.168.1.1a",
            "1.2.3.4.example",
            "999.1.1.1",
            "3.14159",
            "10.0.0.256",
            "1.2.3.1234",
            "a.b.c.d",
            "1..2.3",
            "version 10.2",
            "x.1.2.3.4",
        ],
    );
}

#[test]
fn ipv6() {
    let mut tp = same(&[
        "2001:db8::1",
        "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
        "fe80::1ff:fe23:4567:890a",
        "::ffff:192.0.2.128",
        "2001:db8:0:0:1:0:0:1",
        "FE80::0202:B3FF:FE1E:8329",
        "2001:db8::",
        "2001:db8:85a3::8a2e:370:7334",
    ]);
    tp.extend([
        ("[2001:db8::1]:5432", "2001:db8::1"),
        (
            "client fe80::1ff:fe23:4567:890a connected",
            "fe80::1ff:fe23:4567:890a",
        ),
    ]);
    true_positives(Detector::Ipv6, &tp);
    false_positives(
        Detector::Ipv6,
        &[
            "::1",
            "::",
            "12:30:45",
            "00:1a:2b:3c:4d:5e",
            "abc::def",
            "std::vector",
            "1:2:3:4:5:6:7:8:9",
            "2001:db8:::1",
            "a:b",
            "12345::1",
            "2001::db8::1",
            "fe80:",
            "Foo::Bar::baz",
            "x2001:db8::1",
            "1:2:3:4:5:6:7",
        ],
    );
}

fn jwt(header: &str, payload: &str, sig: &str) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload),
        sig
    )
}

#[test]
fn jwt_tokens() {
    let io = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c".to_string();
    let owned = [
        io.clone(),
        jwt(
            r#"{"alg":"RS256","typ":"JWT","kid":"k1"}"#,
            r#"{"sub":"agent-7","groups":["sre"]}"#,
            "c2lnbmF0dXJl-_x",
        ),
        jwt(
            r#"{"alg":"ES256"}"#,
            r#"{"iss":"https://idp.example.com","exp":1900000000}"#,
            "MEUCIQ",
        ),
        jwt(r#"{"alg":"none"}"#, r#"{"sub":"x"}"#, ""),
        jwt(r#"{"typ":"JWT","alg":"HS512"}"#, r#"{"a":1}"#, "AAAA"),
    ];
    let mut tp: Vec<(String, String)> = owned.iter().map(|t| (t.clone(), t.clone())).collect();
    tp.push((format!("Authorization: Bearer {io}"), io.clone()));
    tp.push((format!("{{\"token\":\"{io}\"}}"), io.clone()));
    tp.push((format!("?access_token={io}&x=1"), io.clone()));
    let refs: Vec<(&str, &str)> = tp.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    true_positives(Detector::Jwt, &refs);
    let no_alg = jwt(r#"{"typ":"JWT"}"#, r#"{"a":1}"#, "sig");
    let not_json = format!(
        "{}.eyJhIjoxfQ.sig",
        URL_SAFE_NO_PAD.encode("eyJ not a header")
    );
    false_positives(
        Detector::Jwt,
        &[
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9",
            &no_alg,
            &not_json,
            "eyeball.eyelash.eyebrow",
            "eyJ.eyJ.x",
            "eyJhbGciOiJIUzI1NiJ9.notjson.sig",
            "eyJhbGciOiJIUzI1NiJ9..sig",
            "xeyJhbGciOiJIUzI1NiJ9.eyJhIjoxfQ.sig",
            "eyJ!!!!!!!!!!.eyJhIjoxfQ.sig",
            &format!("{io}.extra"),
            "hello.world.foo",
            "eyJhbGciOiJIUzI1NiJ9.eyJhIjoxfQ",
        ],
    );
}

#[test]
fn aws_key() {
    let mut tp = same(&[
        "AKIAIOSFODNN7EXAMPLE",
        "ASIAY34FZKBOKMUTVV7A",
        "AIDAJQABLZS4A3QDU576",
        "AROA1234567890ABCDEF",
        "AKIA2E0A8F3B244C9986",
    ]);
    tp.extend([
        (
            "aws_access_key_id=AKIAIOSFODNN7EXAMPLE",
            "AKIAIOSFODNN7EXAMPLE",
        ),
        (
            "\"AccessKeyId\": \"ASIAY34FZKBOKMUTVV7A\"",
            "ASIAY34FZKBOKMUTVV7A",
        ),
    ]);
    true_positives(Detector::AwsKey, &tp);
    false_positives(
        Detector::AwsKey,
        &[
            "AKIAIOSFODNN7EXAMPL",
            "AKIAIOSFODNN7EXAMPLEX",
            "akiaiosfodnn7example",
            "AKIAiosfodnn7example",
            "XKIAIOSFODNN7EXAMPLE",
            "AKIA_IOSFODNN7EXAMPLE",
            "AKIA",
            "KEYAKIAIOSFODNN7EXAMPLE",
            "AKIAIOSFODNN7EXAMPLE2",
            "ABCDEFGHIJKLMNOPQRST",
        ],
    );
}

#[test]
fn secret_token() {
    let ghp = format!("ghp_{}", "aB3dE5fG7hJ9kL1mN2pQ4rS6tU8vW0xY2zA4");
    let tp = vec![
        (ghp.clone(), ghp.clone()),
        (
            "github_pat_11ABCDEFG0abcdefghij_klmnopqrstuvwxyz0123456789".into(),
            "github_pat_11ABCDEFG0abcdefghij_klmnopqrstuvwxyz0123456789".into(),
        ),
        (
            "glpat-abcdefghij0123456789".into(),
            "glpat-abcdefghij0123456789".into(),
        ),
        (
            "xoxb-1234567890-abcdefghijkl".into(),
            "xoxb-1234567890-abcdefghijkl".into(),
        ),
        (
            "sk_live_4eC39HqLyjWDarjtT1zdp7dc".into(),
            "sk_live_4eC39HqLyjWDarjtT1zdp7dc".into(),
        ),
        (
            "sk-proj-abcdefghijklmnopqrstuvwx".into(),
            "sk-proj-abcdefghijklmnopqrstuvwx".into(),
        ),
        (
            "AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY".into(),
            "AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY".into(),
        ),
        (
            "Zx9Kq2LmP8vT4rW7yB1nC6dF".into(),
            "Zx9Kq2LmP8vT4rW7yB1nC6dF".into(),
        ),
        (
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
        ),
        (
            "dGhpcyBpcyBhIHNlY3JldCB2YWx1ZTEyMw==".into(),
            "dGhpcyBpcyBhIHNlY3JldCB2YWx1ZTEyMw==".into(),
        ),
        (
            "api_key=Qm9vZ3lXb29neTEyMzQ1Njc4OTBhYmM".into(),
            "Qm9vZ3lXb29neTEyMzQ1Njc4OTBhYmM".into(),
        ),
        (
            "token: r8Ht2KxW9pL4mN7qZ3vB5cY1dF6gJ0sA.".into(),
            "r8Ht2KxW9pL4mN7qZ3vB5cY1dF6gJ0sA".into(),
        ),
        (
            "npm_aB3dE5fG7hJ9kL1mN2pQ4rS6tU8vW0xY2zA4".into(),
            "npm_aB3dE5fG7hJ9kL1mN2pQ4rS6tU8vW0xY2zA4".into(),
        ),
        (
            "hf_aB3dE5fG7hJ9kL1mN2pQ4rS6tU8vW0xY2zA4".into(),
            "hf_aB3dE5fG7hJ9kL1mN2pQ4rS6tU8vW0xY2zA4".into(),
        ),
        (
            "Bearer 9fK2mQ7xL4pR8tW1zY6vB3nC5hJ0dG-_".into(),
            "9fK2mQ7xL4pR8tW1zY6vB3nC5hJ0dG".into(),
        ),
    ];
    let refs: Vec<(&str, &str)> = tp.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    true_positives(Detector::SecretToken, &refs);
    false_positives(
        Detector::SecretToken,
        &[
            "550e8400-e29b-41d4-a716-446655440000",
            "550E8400-E29B-41D4-A716-446655440000",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "da39a3ee5e6b4b0d3255bfef95601890afd80709",
            "getUserAccountById2023",
            "HttpServerConfigurationBuilder2",
            "/usr/local/lib/x86_64-linux-gnu",
            "/home/User/Documents/Report2024Final",
            "MAX_CONNECTIONS_PER_HOST_2024",
            "the_quick_brown_fox_jumps_over",
            "Pneumonoultramicroscopicsilicovolcanoconiosis",
            "2024-01-15T10:30:00Z",
            "com.example.MyApplication2",
            "ghp_short",
            "sk-short",
            "Zx9Kq2LmP8vT4rW7yB1n@example.com",
            "ProductCategoryV2Id",
            "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
        ],
    );
}

#[test]
fn pem_private_key() {
    let rsa = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy\n-----END RSA PRIVATE KEY-----";
    let pkcs8 = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----";
    let ec = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg\n-----END EC PRIVATE KEY-----";
    let ossh = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----";
    let enc = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIFDjBABgkqhkiG9w0BBQ0w\n-----END ENCRYPTED PRIVATE KEY-----";
    let json_escaped =
        r#"-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49\n-----END PRIVATE KEY-----"#;
    let truncated = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqG";
    let in_text = format!("key:\n{rsa}\ntrailing words");
    let two = format!("{ec} and {pkcs8}");
    let cases = [
        (rsa, rsa),
        (pkcs8, pkcs8),
        (ec, ec),
        (ossh, ossh),
        (enc, enc),
        (json_escaped, json_escaped),
        (truncated, truncated),
        (in_text.as_str(), rsa),
    ];
    true_positives(Detector::PemPrivateKey, &cases);
    let got = find(DetectorSet::all(), two.as_bytes());
    assert_eq!(got.len(), 2);
    false_positives(
        Detector::PemPrivateKey,
        &[
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
            "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----",
            "-----BEGIN RSA PUBLIC KEY-----",
            "----- BEGIN PRIVATE KEY -----",
            "-----BEGIN PRIVATE KEY",
            "-----BEGIN private key-----",
            "-- a SQL comment",
            "----------",
        ],
    );
}

#[test]
fn clean_prose_and_numbers_are_left_alone() {
    let text = "Order 12345 shipped on 2024-01-15 at 10:30:45 for $1,234.56 (qty 3, v2.1.0). \
                Customer Jane Smith wrote: the package arrived damaged; please refund. \
                Ref 550e8400-e29b-41d4-a716-446655440000, sha da39a3ee5e6b4b0d3255bfef95601890afd80709, \
                std::vector<int> used in HttpServerConfigurationBuilder2.";
    let got = find(DetectorSet::all(), text.as_bytes());
    assert!(
        got.is_empty(),
        "{:?}",
        got.iter()
            .map(|m| (&m.detector, &text[m.range.clone()]))
            .collect::<Vec<_>>()
    );
}
