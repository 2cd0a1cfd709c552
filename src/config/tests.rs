//! Config loading tests on inline YAML.

use super::*;
use secrecy::ExposeSecret;

/// A temp dir holding secret files, and a YAML template whose `{dir}` points at it.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    /// Secret files owner-only, as they should be (a wider mode is a warning).
    fn new() -> Fixture {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in [("token", "plivo-secret\n"), ("key", "audit-key")] {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        Fixture { dir }
    }

    fn yaml(&self, body: &str) -> String {
        body.replace("{dir}", &self.dir.path().display().to_string())
    }

    fn load(&self, body: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(&self.yaml(body))
    }

    /// The message of the error `body` must give.
    fn error_of(&self, body: &str) -> String {
        messages(self.load(body).err().expect("invalid"))
    }
}

const MINIMAL: &str = r#"
accounts:
  default:
    auth_id: MAXXXXXXXXXXXXXXXXXX
    auth_token: {file: "{dir}/token"}
tenants:
  billing:
    tokens: ["sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"]
    allow: ["billing-*"]
    rate_limit: {per_second: 5, burst: 10}
audit:
  path: "{dir}/audit.jsonl"
"#;

fn messages(err: ConfigError) -> String {
    err.to_string()
}

#[test]
fn minimal_config_gets_defaults() {
    let fixture = Fixture::new();
    let config = fixture.load(MINIMAL).expect("valid");
    assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(config.admin_listen.to_string(), "127.0.0.1:9090");
    assert_eq!(config.shutdown_grace, Duration::from_secs(20));
    assert_eq!(
        config.upstream.base_url.to_string(),
        "https://api.plivo.com"
    );
    assert_eq!(config.upstream.connect_timeout, Duration::from_secs(2));
    assert_eq!(config.upstream.timeout, Duration::from_secs(10));
    assert_eq!(config.upstream.max_attempts, 3);
    let account = &config.accounts["default"];
    assert_eq!(account.auth_token.expose_secret(), "plivo-secret");
    assert_eq!(account.rate_limit.per_second.get(), 50);
    assert_eq!(account.rate_limit.burst.get(), 50);
    let tenant = &config.tenants["billing"];
    assert_eq!(tenant.account, "default");
    assert_eq!(tenant.rate_limit.burst.get(), 10);
    assert_eq!(config.audit.fsync, Fsync::Always);
    assert_eq!(config.audit.rotate_bytes, 104_857_600);
    assert!(config.audit.hmac_key.is_none());
    assert_eq!(config.log.format, LogFormat::Json);
    assert_eq!(config.log.level, "info");
    assert_eq!(config.worker_threads, 0, "one worker per CPU");
    assert_eq!(config.rate_limit_store, RateLimitStoreSettings::Local);
}

#[test]
fn a_redis_store_given_only_its_url_gets_the_documented_defaults() {
    let fixture = Fixture::new();
    let yaml =
        format!("{MINIMAL}rate_limit_store:\n  kind: redis\n  url: redis://127.0.0.1:6379/0\n");
    let config = fixture.load(&yaml).expect("valid");
    let RateLimitStoreSettings::Redis(redis) = &config.rate_limit_store else {
        panic!("kind: redis gives the Redis store");
    };
    assert_eq!(redis.url, "redis://127.0.0.1:6379/0");
    assert_eq!(redis.key_prefix, "mpc-gateway");
    assert_eq!(redis.timeout, Duration::from_millis(50));
    assert_eq!(redis.on_error, OnStoreError::Local);
}

#[test]
fn the_example_config_in_the_repo_parses() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/gateway.yaml"))
        .expect("config/gateway.yaml exists");
    parse_raw(&text).expect("config/gateway.yaml parses");
}

#[test]
fn unknown_key_is_reported_with_its_path() {
    let fixture = Fixture::new();
    let yaml = MINIMAL.replace("    allow:", "    allwo: [x]\n    allow:");
    let err = messages(fixture.load(&yaml).err().expect("invalid"));
    assert!(
        err.starts_with("tenants.billing.allwo: unknown field `allwo`"),
        "{err}"
    );
}

#[test]
fn non_positive_burst_names_the_key() {
    let fixture = Fixture::new();
    let yaml = MINIMAL.replace("burst: 10", "burst: 0");
    let err = messages(fixture.load(&yaml).err().expect("invalid"));
    assert!(
        err.starts_with("tenants.billing.rate_limit.burst: expected a positive integer"),
        "{err}"
    );
}

#[test]
fn bad_duration_names_the_key() {
    let fixture = Fixture::new();
    let yaml = format!("{MINIMAL}upstream:\n  timeout: soon\n");
    let err = messages(fixture.load(&yaml).err().expect("invalid"));
    assert!(
        err.starts_with("upstream.timeout: expected a duration"),
        "{err}"
    );
}

#[test]
fn literal_secret_is_a_config_error() {
    let fixture = Fixture::new();
    let yaml = MINIMAL.replace("{file: \"{dir}/token\"}", "hunter2");
    let err = messages(fixture.load(&yaml).err().expect("invalid"));
    assert!(
        err.contains("accounts.default.auth_token: a secret must come from"),
        "{err}"
    );
    assert!(!err.contains("hunter2"));
}

/// serde's own message would quote the number: the secret would reach the terminal and
/// the operational log (a reload reports the same way).
#[test]
fn an_unquoted_numeric_secret_is_a_config_error_that_does_not_show_it() {
    let fixture = Fixture::new();
    let yaml = MINIMAL.replace("{file: \"{dir}/token\"}", "8472910384756610");
    let err = messages(fixture.load(&yaml).err().expect("invalid"));
    assert!(
        err.contains("accounts.default.auth_token: found a number"),
        "{err}"
    );
    assert!(!err.contains("8472910384756610"), "{err}");
}

#[test]
fn missing_secret_file_and_env_are_reported() {
    let fixture = Fixture::new();
    let yaml = MINIMAL.replace("{dir}/token", "{dir}/missing").replace(
        "MAXXXXXXXXXXXXXXXXXX",
        "{env: MPC_GATEWAY_TEST_UNSET_AUTH_ID}",
    );
    let err = messages(fixture.load(&yaml).err().expect("invalid"));
    assert!(
        err.contains("accounts.default.auth_token: cannot read"),
        "{err}"
    );
    assert!(
        err.contains(
            "accounts.default.auth_id: environment variable MPC_GATEWAY_TEST_UNSET_AUTH_ID"
        ),
        "{err}"
    );
}

#[test]
fn bad_token_hash_and_unknown_account_are_all_reported() {
    let fixture = Fixture::new();
    let yaml = MINIMAL.replace("sha256:2c26", "sha256:XX26").replace(
        "    rate_limit: {per_second: 5",
        "    account: nope\n    rate_limit: {per_second: 5",
    );
    let err = messages(fixture.load(&yaml).err().expect("invalid"));
    assert!(
        err.contains("tenants.billing.tokens[0]: expected \"sha256:\""),
        "{err}"
    );
    assert!(
        err.contains("tenants.billing.account: no account named \"nope\""),
        "{err}"
    );
}

#[test]
fn same_token_for_two_tenants_is_refused() {
    let fixture = Fixture::new();
    let second_tenant = "  other:\n    tokens: [\"sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\"]\n    allow: [\"*\"]\naudit:";
    let yaml = MINIMAL.replace("audit:", second_tenant);
    let err = messages(fixture.load(&yaml).err().expect("invalid"));
    assert!(
        err.contains(
            "tenants.other.tokens[0]: the same token hash is also listed for tenant billing"
        ),
        "{err}"
    );
}

/// A hash repeated within one tenant is named as such, not as a clash with another.
#[test]
fn same_token_twice_in_one_tenant_is_refused_as_such() {
    let fixture = Fixture::new();
    let hash = "\"sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\"";
    let yaml = MINIMAL.replacen(&format!("[{hash}]"), &format!("[{hash}, {hash}]"), 1);
    assert_ne!(yaml, MINIMAL, "the fixture lists the hash once");
    let err = messages(fixture.load(&yaml).err().expect("invalid"));
    assert!(
        err.contains(
            "tenants.billing.tokens[1]: the same token hash is listed twice in this tenant's tokens"
        ),
        "{err}"
    );
}

#[test]
fn upstream_timeouts_are_bounded() {
    let fixture = Fixture::new();
    let yaml = format!("{MINIMAL}upstream:\n  timeout: 300000000000y\n  connect_timeout: 11m\n");
    let err = messages(fixture.load(&yaml).err().expect("invalid"));
    assert!(
        err.contains("upstream.timeout: expected at most 10m"),
        "{err}"
    );
    assert!(
        err.contains("upstream.connect_timeout: expected at most 10m"),
        "{err}"
    );
}

/// A grace this long would overflow the drain's deadline (an abort on SIGTERM, before the
/// audit log's last flush); a Redis timeout too, like the upstream's.
#[test]
fn the_shutdown_grace_and_the_store_timeout_are_bounded() {
    let fixture = Fixture::new();
    let yaml = format!(
        "{MINIMAL}shutdown_grace: 18446744073709551615s\nrate_limit_store:\n  kind: redis\n  url: redis://127.0.0.1:6379\n  timeout: 11m\n"
    );
    let err = messages(fixture.load(&yaml).err().expect("invalid"));
    assert!(err.contains("shutdown_grace: expected at most 1h"), "{err}");
    assert!(
        err.contains("rate_limit_store.timeout: expected at most 10m"),
        "{err}"
    );
    let at_the_bounds = format!(
        "{MINIMAL}shutdown_grace: 1h\nrate_limit_store:\n  kind: redis\n  url: redis://127.0.0.1:6379\n  timeout: 10m\n"
    );
    fixture.load(&at_the_bounds).expect("valid at the bounds");
}

#[test]
fn rotate_bytes_below_minimum_is_an_error() {
    let fixture = Fixture::new();
    let yaml = MINIMAL.replace(
        "  path: \"{dir}/audit.jsonl\"",
        "  path: \"{dir}/audit.jsonl\"\n  rotate_bytes: 100",
    );
    let err = messages(fixture.load(&yaml).err().expect("invalid"));
    assert!(
        err.contains("audit.rotate_bytes: expected at least 1024"),
        "{err}"
    );
}

/// The writer names its lock, saved head and rotated files after the live file, so
/// `audit.path` must end in a file name; a directory is refused here, with its key,
/// rather than when the log is opened.
#[test]
fn an_audit_path_that_names_no_file_is_refused() {
    let fixture = Fixture::new();
    for (path, expected) in [
        ("", "audit.path: must not be empty"),
        ("{dir}/", "audit.path: must name a file;"),
        ("{dir}/logs/.", "audit.path: must name a file;"),
        ("{dir}/..", "audit.path: must name a file;"),
    ] {
        let yaml = MINIMAL.replace(
            "  path: \"{dir}/audit.jsonl\"",
            &format!("  path: \"{path}\""),
        );
        let err = messages(fixture.load(&yaml).err().expect("invalid"));
        assert!(err.contains(expected), "{path:?}: {err}");
    }
    let config = fixture.load(MINIMAL).expect("valid");
    assert_eq!(config.audit.path.file_name(), "audit.jsonl");
    assert_eq!(config.audit.path.dir(), fixture.dir.path());
}

#[test]
fn hmac_key_from_file_is_trimmed_bytes() {
    let fixture = Fixture::new();
    let yaml = MINIMAL.replace(
        "  path: \"{dir}/audit.jsonl\"",
        "  path: \"{dir}/audit.jsonl\"\n  hmac_key: {file: \"{dir}/key\"}\n  fsync: never",
    );
    let config = fixture.load(&yaml).expect("valid");
    let key = config.audit.hmac_key.expect("key");
    assert_eq!(key.expose_secret(), b"audit-key");
    assert_eq!(config.audit.fsync, Fsync::Never);
}

#[test]
fn summary_holds_no_secret_or_hash() {
    let fixture = Fixture::new();
    let config = fixture.load(MINIMAL).expect("valid");
    let summary = config.summary();
    assert!(summary.contains("tenant billing: 1 token(s), 0 client-certificate SAN(s)"));
    assert!(!summary.contains("plivo-secret"));
    assert!(!summary.contains("2c26b46b"));
}

const BILLING_TOKEN_LINE: &str =
    "    tokens: [\"sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\"]\n";

/// Writes a listener certificate, key and client CA into the fixture's dir; returns the
/// `listen_tls` block (verifying client certificates) that names them.
fn listen_tls_with_client_ca(fixture: &Fixture) -> &'static str {
    let pki = crate::simulator::generate_pki(&["localhost"]).expect("pki");
    for (file, pem) in [
        ("server.pem", &pki.server_cert_pem),
        ("server-key.pem", &pki.server_key_pem),
        ("clients-ca.pem", &pki.ca_cert_pem),
    ] {
        std::fs::write(fixture.dir.path().join(file), pem).expect("write");
    }
    "listen_tls:\n  cert_file: \"{dir}/server.pem\"\n  key_file: \"{dir}/server-key.pem\"\n  client_ca_file: \"{dir}/clients-ca.pem\"\n"
}

/// MINIMAL behind `listen_tls` with a client CA; billing lists `billing_sans` beside its
/// token, and a tenant `ops` lists `ops_sans` (YAML flow sequences).
fn with_client_cert_sans(fixture: &Fixture, billing_sans: &str, ops_sans: &str) -> String {
    let tenants = MINIMAL
        .replace(
            BILLING_TOKEN_LINE,
            &format!("{BILLING_TOKEN_LINE}    client_cert_sans: {billing_sans}\n"),
        )
        .replace(
            "audit:\n",
            &format!("  ops:\n    client_cert_sans: {ops_sans}\n    allow: [\"*\"]\naudit:\n"),
        );
    format!("{}{tenants}", listen_tls_with_client_ca(fixture))
}

#[test]
fn a_tenant_may_authenticate_by_client_certificate_only() {
    let fixture = Fixture::new();
    let yaml = format!(
        "{}{}",
        listen_tls_with_client_ca(&fixture),
        MINIMAL.replace(
            BILLING_TOKEN_LINE,
            "    client_cert_sans: [\"spiffe://prod/ns/billing/sa/api\"]\n"
        )
    );
    let config = fixture.load(&yaml).expect("valid");
    let billing = &config.tenants["billing"];
    assert!(billing.tokens.is_empty());
    assert_eq!(
        billing.client_cert_sans,
        [CertSan::uri("spiffe://prod/ns/billing/sa/api")]
    );
}

/// DNS names do not depend on case (RFC 4343): a DNS entry is lower-cased at load, as a
/// certificate's DNS SAN is before it is looked up. A URI entry is kept exactly.
#[test]
fn dns_entries_of_client_cert_sans_are_lower_cased_and_uris_kept() {
    let fixture = Fixture::new();
    let yaml = with_client_cert_sans(
        &fixture,
        r#"["OPS.Internal", "spiffe://Prod/ns/Billing"]"#,
        r#"["spiffe://prod/ns/billing"]"#,
    );
    let config = fixture
        .load(&yaml)
        .expect("valid: URIs differing in case are two SANs");
    assert_eq!(
        config.tenants["billing"].client_cert_sans,
        [
            CertSan::Dns("ops.internal".to_owned()),
            CertSan::Uri("spiffe://Prod/ns/Billing".to_owned())
        ]
    );
    assert_eq!(
        config.tenants["ops"].client_cert_sans,
        [CertSan::Uri("spiffe://prod/ns/billing".to_owned())]
    );
}

/// The duplicate check compares SANs as they are matched: one DNS name in two tenants,
/// spelt in different case, is refused (it would name both).
#[test]
fn a_dns_san_in_two_tenants_differing_only_in_case_is_an_error() {
    let fixture = Fixture::new();
    let yaml = with_client_cert_sans(&fixture, r#"["ops.internal"]"#, r#"["OPS.INTERNAL"]"#);
    let err = fixture.error_of(&yaml);
    assert!(
        err.contains(
            "tenants.ops.client_cert_sans[0]: the same SAN is also listed for tenant billing"
        ),
        "{err}"
    );
    let within_one = with_client_cert_sans(
        &fixture,
        r#"["billing.internal", "Billing.Internal"]"#,
        r#"["ops.internal"]"#,
    );
    let err = fixture.error_of(&within_one);
    assert!(
        err.contains(
            "tenants.billing.client_cert_sans[1]: the same SAN is also listed for tenant billing"
        ),
        "{err}"
    );
}

#[test]
fn listen_tls_errors_name_their_key() {
    let fixture = Fixture::new();
    let pki = crate::simulator::generate_pki(&["localhost"]).expect("pki");
    std::fs::write(fixture.dir.path().join("server.pem"), &pki.server_cert_pem).expect("write");
    let cases = [
        (
            "  cert_file: \"{dir}/server.pem\"\n  key_file: \"{dir}/no-such-key.pem\"\n",
            "listen_tls.key_file: cannot read",
        ),
        (
            "  cert_file: \"{dir}/no-such-cert.pem\"\n  key_file: \"{dir}/no-such-key.pem\"\n",
            "listen_tls.cert_file: cannot read",
        ),
        (
            "  cert_file: \"{dir}/server.pem\"\n  key_file: \"{dir}/server.pem\"\n",
            "listen_tls.key_file:",
        ),
    ];
    for (tls, expected) in cases {
        let yaml = format!("listen_tls:\n{tls}{MINIMAL}");
        let err = messages(fixture.load(&yaml).err().expect("invalid"));
        assert!(err.contains(expected), "{expected:?} in {err}");
    }
}

#[test]
fn client_cert_sans_without_a_client_ca_is_an_error() {
    let fixture = Fixture::new();
    let yaml = MINIMAL.replace(
        BILLING_TOKEN_LINE,
        &format!("{BILLING_TOKEN_LINE}    client_cert_sans: [\"billing.internal\"]\n"),
    );
    let err = messages(fixture.load(&yaml).err().expect("invalid"));
    assert!(
        err.contains("tenants.billing.client_cert_sans: needs listen_tls.client_ca_file"),
        "{err}"
    );
}

#[test]
fn an_ip_address_in_client_cert_sans_is_an_error() {
    let fixture = Fixture::new();
    let yaml = MINIMAL.replace(
        BILLING_TOKEN_LINE,
        &format!("{BILLING_TOKEN_LINE}    client_cert_sans: [\"billing.internal\", \"10.9.8.7\", \"::1\"]\n"),
    );
    let err = messages(fixture.load(&yaml).err().expect("invalid"));
    for index in [1, 2] {
        assert!(
            err.contains(&format!(
                "tenants.billing.client_cert_sans[{index}]: an IP address; only URI and DNS SANs are matched"
            )),
            "{err}"
        );
    }
    assert!(!err.contains("client_cert_sans[0]"), "{err}");
}

#[test]
fn a_tenant_with_neither_tokens_nor_certificates_is_one_error() {
    let fixture = Fixture::new();
    let yaml = MINIMAL.replace(BILLING_TOKEN_LINE, "    tokens: []\n");
    let err = messages(fixture.load(&yaml).err().expect("invalid"));
    let expected =
        "tenants.billing.tokens: at least one token hash (or client_cert_sans) is required";
    assert_eq!(err.matches(expected).count(), 1, "{err}");
    assert_eq!(err.matches("tenants.billing.tokens").count(), 1, "{err}");
}

/// TLS to Redis is not built in: the error says so, without showing the URL (it may
/// hold a password).
#[test]
fn a_rediss_url_is_refused_as_unsupported() {
    let f = Fixture::new();
    let text = format!(
        "{MINIMAL}rate_limit_store:\n  kind: redis\n  url: REDISS://:hunter2@cache.internal:6380/0\n"
    );
    let err = messages(f.load(&text).err().expect("unsupported"));
    assert!(
        err.contains("rate_limit_store.url: rediss:// (TLS to Redis) is not supported"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}

/// A bad duration's error names its own line, not the line of the mapping around it.
#[test]
fn a_bad_duration_names_its_line() {
    let f = Fixture::new();
    let text = format!("{MINIMAL}upstream:\n  max_attempts: 3\n  timeout: 20\n");
    let line = text
        .lines()
        .position(|l| l == "  timeout: 20")
        .expect("line")
        + 1;
    let err = messages(f.load(&text).err().expect("a number without a unit"));
    assert!(err.contains("upstream.timeout"), "{err}");
    assert!(
        err.contains("got 20: a number needs a unit, for example 20s or 20ms"),
        "{err}"
    );
    assert!(!err.contains("sec"), "humantime's `20sec` hint: {err}");
    assert!(err.contains(&format!("line {line} ")), "{err}");
}

/// humantime's longer forms are durations too (the README says so); anything it cannot
/// read is refused with its own reason.
#[test]
fn durations_take_humantimes_syntax() {
    let f = Fixture::new();
    for (text, expected) in [
        ("1s 500ms", Duration::from_millis(1500)),
        ("2 seconds", Duration::from_secs(2)),
        ("250ms", Duration::from_millis(250)),
    ] {
        let yaml = format!("{MINIMAL}upstream:\n  timeout: {text}\n");
        let config = f.load(&yaml).unwrap_or_else(|e| panic!("{text}: {e:?}"));
        assert_eq!(config.upstream.timeout, expected, "{text}");
    }
    for (text, number) in [
        ("1.5", true),
        ("-2s", false),
        ("2 fortnights", false),
        (".", false),
        ("1.2.3", false),
    ] {
        let yaml = format!("{MINIMAL}upstream:\n  timeout: \"{text}\"\n");
        let err = messages(f.load(&yaml).err().expect("invalid"));
        assert!(
            err.starts_with("upstream.timeout: expected a duration"),
            "{text}: {err}"
        );
        // Only a number is told to add a unit (`1.5s` is a duration humantime reads).
        assert_eq!(
            err.contains(&format!("for example {text}s or {text}ms")),
            number,
            "{text}: {err}"
        );
    }
}

/// The example configs list 64 zeros where a hash goes; one left in place is said, so
/// a tenant that cannot authenticate is found before its first refused call.
#[test]
fn warns_of_a_placeholder_token_hash_left_in_place() {
    let f = Fixture::new();
    let real = "\"sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae\"";
    let placeholder = format!("{real}, \"sha256:{}\"", "0".repeat(64));
    let config = f.load(&MINIMAL.replace(real, &placeholder)).expect("valid");
    let warnings = config.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].key, "tenants.billing.tokens[1]");
    assert!(
        warnings[0].message.contains("placeholder"),
        "{}",
        warnings[0]
    );
}

#[test]
fn warns_of_a_grace_not_above_the_upstream_timeout_and_of_a_burst_below_two() {
    let f = Fixture::new();
    let config = f.load(MINIMAL).expect("valid");
    assert_eq!(
        config.warnings(),
        [],
        "the defaults: 20s grace, 10s timeout, account burst 50"
    );

    let risky = MINIMAL.replace(
        "    auth_token: {file: \"{dir}/token\"}\n",
        "    auth_token: {file: \"{dir}/token\"}\n    rate_limit: {per_second: 1, burst: 1}\n",
    ) + "shutdown_grace: 5s\nupstream:\n  timeout: 5s\n";
    let config = f.load(&risky).expect("valid, if unwise");
    let warnings = config.warnings();
    let keys: Vec<&str> = warnings.iter().map(|w| w.key.as_str()).collect();
    assert_eq!(
        keys,
        ["accounts.default.rate_limit.burst", "shutdown_grace"]
    );
    assert!(
        warnings[0].message.starts_with("1 is below the two calls"),
        "{}",
        warnings[0]
    );
    assert!(
        warnings[1]
            .message
            .starts_with("5s is not above upstream.timeout (5s)"),
        "{}",
        warnings[1]
    );

    // After a reload the grace still running counts, not the file's.
    let running = config.warnings_with_grace(Duration::from_secs(20));
    assert!(
        running.iter().all(|w| w.key != "shutdown_grace"),
        "{running:?}"
    );

    let longer = risky.replace("shutdown_grace: 5s", "shutdown_grace: 5s 1ms");
    let config = f.load(&longer).expect("valid");
    assert!(config.warnings().iter().all(|w| w.key != "shutdown_grace"));
}

#[test]
fn a_tenant_or_account_given_twice_is_refused_not_replaced() {
    let fixture = Fixture::new();
    let tenant_twice = MINIMAL.replace(
        "audit:",
        r#"  billing:
    tokens: ["sha256:fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9"]
    allow: ["*"]
audit:"#,
    );
    let err = messages(
        fixture
            .load(&tenant_twice)
            .err()
            .expect("a repeated tenant"),
    );
    assert!(err.contains("tenants"), "{err}");
    assert!(err.contains("`billing` is given twice"), "{err}");

    let account_twice = MINIMAL.replace(
        "tenants:",
        r#"  default:
    auth_id: MAYYYYYYYYYYYYYYYYYY
    auth_token: {file: "{dir}/token"}
tenants:"#,
    );
    let err = messages(
        fixture
            .load(&account_twice)
            .err()
            .expect("a repeated account"),
    );
    assert!(err.contains("accounts"), "{err}");
    assert!(err.contains("`default` is given twice"), "{err}");

    // Different names still load, in any number.
    let two_tenants = MINIMAL.replace(
        "audit:",
        r#"  support:
    tokens: ["sha256:fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9"]
    allow: ["support-*"]
audit:"#,
    );
    let config = fixture.load(&two_tenants).expect("two tenants");
    assert_eq!(config.tenants.len(), 2);
}

#[test]
fn listeners_on_one_port_are_a_config_error() {
    let fixture = Fixture::new();
    for (listen, admin, collide) in [
        ("127.0.0.1:8080", "127.0.0.1:8080", true),
        ("0.0.0.0:8080", "127.0.0.1:8080", true),
        ("127.0.0.1:8080", "[::]:8080", true),
        ("127.0.0.1:8080", "127.0.0.1:9090", false),
        ("127.0.0.1:8080", "127.0.0.2:8080", false),
        ("127.0.0.1:0", "127.0.0.1:0", false),
        ("[::ffff:127.0.0.1]:8080", "127.0.0.1:8080", true),
    ] {
        let yaml = format!("listen: \"{listen}\"\nadmin_listen: \"{admin}\"\n{MINIMAL}");
        match fixture.load(&yaml) {
            Ok(_) => assert!(!collide, "{listen} and {admin} were accepted"),
            Err(err) => {
                let err = messages(err);
                assert!(collide, "{listen} and {admin}: {err}");
                assert!(err.contains("admin_listen"), "{err}");
                assert!(err.contains("own port"), "{err}");
            }
        }
    }
}

/// A token pasted where its hash belongs never reaches the error (which `check-config`
/// prints and a failed reload logs), whatever YAML made of it.
#[test]
fn a_token_in_place_of_its_hash_is_refused_without_showing_it() {
    let fixture = Fixture::new();
    let hashes = r#"["sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"]"#;
    for (tokens, secret) in [
        ("mpcgw_SecretTokenValue0123456789", "SecretTokenValue"),
        ("[mpcgw_SecretTokenValue0123456789]", "SecretTokenValue"),
        (
            "[\"sha256:2c26\", mpcgw_SecretTokenValue0123456789]",
            "SecretTokenValue",
        ),
        ("987654321987654321", "987654321"),
        ("[987654321987654321]", "987654321"),
        ("[9876543.21]", "9876543"),
        ("9876543.21", "9876543"),
        ("{mpcgw_SecretTokenValue0123456789: 1}", "SecretTokenValue"),
        ("[[mpcgw_SecretTokenValue0123456789]]", "SecretTokenValue"),
    ] {
        let yaml = MINIMAL.replace(&format!("tokens: {hashes}"), &format!("tokens: {tokens}"));
        assert_ne!(yaml, MINIMAL);
        let err = messages(fixture.load(&yaml).err().expect("refused"));
        assert!(err.contains("tenants.billing.tokens"), "{err}");
        assert!(!err.contains(secret), "{tokens}: {err}");
    }
}

/// A secret file every user may read is warned about under its key path (the fixture's
/// files are owner-only, so the warning is this file's alone).
#[test]
fn a_world_readable_secret_file_is_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    let fixture = Fixture::new();
    // tempdir makes its directory 0700, which would keep every user out anyway.
    std::fs::set_permissions(fixture.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let token = fixture.dir.path().join("token");
    let keyed = format!("{MINIMAL}  hmac_key: {{file: \"{{dir}}/key\"}}\n");
    let owner_only = fixture.load(&keyed).expect("valid");
    assert!(
        owner_only.warnings().is_empty(),
        "{:?}",
        owner_only.warnings()
    );

    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let warnings = fixture.load(&keyed).expect("still valid").warnings();
    let keys: Vec<&str> = warnings.iter().map(|w| w.key.as_str()).collect();
    assert_eq!(keys, ["accounts.default.auth_token"], "{warnings:?}");
    assert!(warnings[0].message.contains("mode 644"), "{}", warnings[0]);
}

#[test]
fn worker_threads_are_bounded() {
    let fixture = Fixture::new();
    fixture
        .load(&format!("worker_threads: 256\n{MINIMAL}"))
        .expect("256 is allowed");
    let err = fixture.error_of(&format!("worker_threads: 100000\n{MINIMAL}"));
    assert!(
        err.contains("worker_threads: expected at most 256"),
        "{err}"
    );
}

#[test]
fn a_base_url_fragment_is_refused_not_dropped() {
    let fixture = Fixture::new();
    let yaml = format!("{MINIMAL}upstream:\n  base_url: \"https://api.plivo.com#frag\"\n");
    let err = fixture.error_of(&yaml);
    assert!(err.contains("upstream.base_url"), "{err}");
    assert!(err.contains("fragment"), "{err}");
}

#[test]
fn a_redis_url_with_a_local_store_is_refused() {
    let fixture = Fixture::new();
    let yaml = format!(
        "{MINIMAL}rate_limit_store:\n  kind: local\n  url: \"redis://:hunter2@127.0.0.1:6379/0\"\n"
    );
    let err = fixture.error_of(&yaml);
    assert!(
        err.contains("rate_limit_store.url: only used with kind: redis"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn warns_of_a_connect_timeout_above_the_call_timeout() {
    let fixture = Fixture::new();
    let yaml = format!("{MINIMAL}upstream:\n  timeout: 2s\n  connect_timeout: 3s\n");
    let warnings = fixture.load(&yaml).expect("valid, if unwise").warnings();
    let found = warnings
        .iter()
        .find(|w| w.key == "upstream.connect_timeout")
        .expect("a warning");
    assert!(
        found
            .message
            .starts_with("3s is longer than upstream.timeout (2s)"),
        "{found}"
    );
}

#[test]
fn a_log_level_that_is_not_a_level_names_the_key() {
    let fixture = Fixture::new();
    let yaml = format!("{MINIMAL}log:\n  level: warning\n");
    let err = fixture.error_of(&yaml);
    assert!(err.contains("log.level"), "{err}");
    assert!(err.contains("\"warning\" is not a level"), "{err}");
}

/// A secret file that is a FIFO (nothing ever writes to it), a device or too large is
/// refused at once, naming the key and not the file.
#[test]
fn a_secret_file_that_is_not_a_small_regular_file_is_refused() {
    let fixture = Fixture::new();
    let fifo = fixture.dir.path().join("fifo");
    crate::files::make_fifo(&fifo);
    let big = fixture.dir.path().join("big");
    std::fs::write(&big, vec![b'a'; 64 * 1024 + 1]).expect("write");
    for (source, why) in [
        (fifo.display().to_string(), "not a regular file"),
        ("/dev/zero".to_owned(), "not a regular file"),
        (big.display().to_string(), "larger than 65536 bytes"),
    ] {
        let yaml = MINIMAL.replace("{dir}/token", &source);
        let err = fixture.error_of(&yaml);
        assert!(
            err.contains("accounts.default.auth_token: cannot read the file it names"),
            "{err}"
        );
        assert!(err.contains(why), "{err}");
        assert!(!err.contains(&source), "{err}");
    }
}

#[test]
fn a_secret_of_whitespace_alone_is_empty_from_env_too() {
    let fixture = Fixture::new();
    std::env::set_var("MPC_GATEWAY_TEST_BLANK_TOKEN", "   ");
    let yaml = MINIMAL.replace(
        "{file: \"{dir}/token\"}",
        "{env: MPC_GATEWAY_TEST_BLANK_TOKEN}",
    );
    let err = fixture.error_of(&yaml);
    assert!(
        err.contains("accounts.default.auth_token: is empty"),
        "{err}"
    );
}

/// The config file itself: a FIFO in its place is refused without waiting for a writer.
#[test]
fn a_config_path_that_is_a_fifo_is_refused_at_once() {
    let fixture = Fixture::new();
    let fifo = fixture.dir.path().join("gateway.yaml");
    crate::files::make_fifo(&fifo);
    let err = messages(Config::load(&fifo).err().expect("a FIFO"));
    assert!(err.contains("not a regular file"), "{err}");
}

#[test]
fn a_listen_address_error_says_what_is_expected() {
    let fixture = Fixture::new();
    let err = fixture.error_of(&format!("listen: \"localhost:8080\"\n{MINIMAL}"));
    assert!(
        err.contains("listen: invalid socket address syntax"),
        "{err}"
    );
    assert!(err.contains("host names are not resolved"), "{err}");
    let err = fixture.error_of(&MINIMAL.replace("burst: 10", "burst: 99999999999"));
    assert!(
        err.contains("expected a positive integer of at most 4294967295, got 99999999999"),
        "{err}"
    );
}

/// Account names end up in metrics labels and audit records, as tenant names do, and are
/// held to the same rule: a record keeps at most 64 bytes of either.
#[test]
fn account_names_are_boring_like_tenant_names() {
    let fixture = Fixture::new();
    let long = "a".repeat(65);
    for bad in [long.as_str(), "\"bill ing\"", "\"ü\""] {
        let body = MINIMAL
            .replace("  default:\n", &format!("  {bad}:\n"))
            .replace(
                "rate_limit: {per_second: 5, burst: 10}",
                &format!("rate_limit: {{per_second: 5, burst: 10}}\n    account: {bad}"),
            );
        let err = fixture.error_of(&body);
        assert!(
            err.contains("account names are 1-64 characters"),
            "{bad}: {err}"
        );
    }
    let body = MINIMAL
        .replace("  default:\n", &format!("  {}:\n", "a".repeat(64)))
        .replace(
            "rate_limit: {per_second: 5, burst: 10}",
            &format!(
                "rate_limit: {{per_second: 5, burst: 10}}\n    account: {}",
                "a".repeat(64)
            ),
        );
    fixture.load(&body).expect("64 characters is a name");
}

/// A Redis password written into the config is allowed but said (auth tokens so written
/// are refused); the same URL from a file, or one without a password, is not.
#[test]
fn warns_of_a_redis_password_written_into_the_config() {
    let f = Fixture::new();
    let store = |url: &str| format!("{MINIMAL}rate_limit_store:\n  kind: redis\n  url: {url}\n");
    let config = f
        .load(&store("redis://:hunter2@127.0.0.1:6379/0"))
        .expect("valid");
    let warnings = config.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].key, "rate_limit_store.url");
    assert!(
        warnings[0].message.contains("{env: NAME}"),
        "{}",
        warnings[0]
    );
    assert!(!warnings[0].to_string().contains("hunter2"));
    let with_user = f
        .load(&store("redis://gateway:hunter2@127.0.0.1:6379/0"))
        .expect("valid");
    assert_eq!(with_user.warnings().len(), 1);

    for quiet in [
        "redis://127.0.0.1:6379/0",
        "redis://gateway@127.0.0.1:6379/0",
    ] {
        let config = f.load(&store(quiet)).expect("valid");
        assert_eq!(config.warnings(), [], "{quiet}");
    }
    let url_file = f.dir.path().join("redis-url");
    std::fs::write(&url_file, "redis://:hunter2@127.0.0.1:6379/0").expect("write");
    let owner_only = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(&url_file, owner_only).expect("chmod");
    let from_file = f
        .load(&store("{file: \"{dir}/redis-url\"}"))
        .expect("valid");
    assert_eq!(from_file.warnings(), []);
}

/// A tenant's SDK auth id equal to a real account's auth id is said, naming the account
/// and not the id.
#[test]
fn warns_of_an_sdk_auth_id_that_is_plivos() {
    let f = Fixture::new();
    let tenant = |id: &str| {
        MINIMAL.replace(
            "    allow: [\"billing-*\"]\n",
            &format!("    allow: [\"billing-*\"]\n    sdk_auth_id: {id}\n"),
        )
    };
    let config = f.load(&tenant("MAXXXXXXXXXXXXXXXXXX")).expect("valid");
    let warnings = config.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].key, "tenants.billing.sdk_auth_id");
    assert!(
        warnings[0].message.contains("accounts.default")
            && !warnings[0].message.contains("MAXXXXXXXXXXXXXXXXXX"),
        "{}",
        warnings[0]
    );
    let made_up = f.load(&tenant("MABILLING00000000001")).expect("valid");
    assert_eq!(made_up.warnings(), []);
}

/// A top-level key given twice is refused with both its lines (serde's own message
/// names none at the top level; nested ones it places itself).
#[test]
fn a_top_level_key_given_twice_names_both_lines() {
    let f = Fixture::new();
    let text = format!("shutdown_grace: 15s\n{MINIMAL}shutdown_grace: 5s\n");
    let second = text.lines().count();
    let err = messages(f.load(&text).err().expect("a duplicate"));
    assert!(
        err.contains(&format!(
            "duplicate field `shutdown_grace` at line {second} (given first at line 1"
        )),
        "{err}"
    );
    let tenants_twice = format!("{MINIMAL}tenants:\n  other:\n    tokens: []\n");
    let err = messages(f.load(&tenants_twice).err().expect("a duplicate"));
    assert!(err.contains("duplicate field `tenants` at line"), "{err}");
}
