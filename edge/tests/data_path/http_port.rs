//! The HTTP port over a real socket: ACME HTTP-01 answers and redirects to https.

use edgible_edge::acme_http::AcmeChallenge;
use edgible_edge::metrics::HttpOutcome;

use crate::support::{TestEdge, http_get, sample, table, test_config};

#[tokio::test]
async fn challenges_are_answered_and_everything_else_redirected() -> anyhow::Result<()> {
    let edge = TestEdge::start(test_config(443), table(vec![])).await?;
    let token = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0";
    let key_authorization = format!("{token}.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI");
    edge.challenges.set_challenges([AcmeChallenge {
        hostname: "app.example.test".parse()?,
        token: token.to_owned(),
        key_authorization: key_authorization.clone(),
    }])?;

    let path = format!("/.well-known/acme-challenge/{token}");
    let (status, _, body) = http_get(edge.addresses.http, &path, "app.example.test").await?;
    assert_eq!(status, 200);
    assert_eq!(body, key_authorization);

    let (status, _, _) = http_get(edge.addresses.http, &path, "other.example.test").await?;
    assert_eq!(status, 404);

    let (status, headers, _) = http_get(edge.addresses.http, "/docs/a?b=c", "app.example.test:80").await?;
    assert_eq!(status, 308);
    assert!(
        headers.iter().any(|line| line.eq_ignore_ascii_case("location: https://app.example.test/docs/a?b=c")),
        "{headers:?}"
    );

    let (status, _, _) = http_get(edge.addresses.http, "/", "127.0.0.1").await?;
    assert_eq!(status, 400);

    assert_eq!(edge.metrics.http_count(HttpOutcome::Challenge), 1);
    let metrics = edge.scrape().await?;
    assert_eq!(sample(&metrics, "edgible_edge_http_requests_total{outcome=\"redirect\"}"), Some(1));
    assert_eq!(sample(&metrics, "edgible_edge_http_requests_total{outcome=\"bad_request\"}"), Some(1));
    assert_eq!(sample(&metrics, "edgible_edge_http_requests_total{outcome=\"challenge_not_found\"}"), Some(1));
    edge.stop().await
}
