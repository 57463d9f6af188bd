//! The proxy's own small HTML pages: errors, refusals and the short-code form. Accessible
//! (a language, a title, labelled fields), no script needed, and every value escaped.

use std::fmt::Write;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::proxy::http::ProxyBody;

/// Escapes text for HTML content and double-quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            character => escaped.push(character),
        }
    }
    escaped
}

/// A page with a heading and one paragraph of plain `message`.
pub fn page(status: StatusCode, title: &str, message: &str) -> Response<ProxyBody> {
    html(status, title, &format!("<p>{}</p>", escape(message)))
}

/// The form asking for an application's short code. `error` is shown above it, announced to
/// screen readers.
pub fn code_form(status: StatusCode, hostname: &str, return_to: &str, error: Option<&str>) -> Response<ProxyBody> {
    let mut body = format!("<p>{} is protected by an access code. Enter it to continue.</p>\n", escape(hostname));
    if let Some(error) = error {
        let _ = writeln!(body, "<p role=\"alert\"><strong>{}</strong></p>", escape(error));
    }
    let _ = write!(
        body,
        "<form method=\"post\" action=\"/.edgible/code\">\n\
         <input type=\"hidden\" name=\"return_to\" value=\"{}\">\n\
         <p><label for=\"code\">Access code</label>\n\
         <input id=\"code\" name=\"code\" type=\"text\" autocomplete=\"off\" autocapitalize=\"off\" \
         spellcheck=\"false\" required maxlength=\"64\"{}></p>\n\
         <p><button type=\"submit\">Continue</button></p>\n</form>",
        escape(return_to),
        if error.is_some() { " aria-invalid=\"true\"" } else { " autofocus" },
    );
    html(status, "Access code required", &body)
}

/// A page with a heading and `body`, which must already be escaped HTML. The title of an
/// error page starts with its status code.
fn html(status: StatusCode, title: &str, body: &str) -> Response<ProxyBody> {
    let title = if status.is_client_error() || status.is_server_error() {
        format!("{} {}", status.as_u16(), escape(title))
    } else {
        escape(title)
    };
    let text = format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n\
         <style>body{{font-family:system-ui,sans-serif;max-width:36rem;margin:3rem auto;padding:0 1rem;\
         line-height:1.5}}input,button{{font-size:1rem;padding:.4rem}}</style>\n\
         </head>\n<body>\n<main>\n<h1>{title}</h1>\n{body}\n</main>\n</body>\n</html>\n"
    );
    let mut response = Response::new(Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn text(response: Response<ProxyBody>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn escapes_everything_that_could_break_out() {
        assert_eq!(escape("<a href=\"x\">'&'</a>"), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
    }

    #[tokio::test]
    async fn pages_are_accessible_html_with_escaped_values() {
        let response = page(StatusCode::FORBIDDEN, "No <access>", "not for <script>");
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
        let body = text(response).await;
        assert!(body.starts_with("<!doctype html>\n<html lang=\"en\">"));
        assert!(body.contains("<title>403 No &lt;access&gt;</title>"));
        assert!(body.contains("not for &lt;script&gt;") && !body.contains("<script"));

        let form =
            text(code_form(StatusCode::UNAUTHORIZED, "app.example.test", "/a?b=\"c\"", Some("Wrong code"))).await;
        assert!(form.contains("<label for=\"code\">") && form.contains("id=\"code\""));
        assert!(form.contains("value=\"/a?b=&quot;c&quot;\""));
        assert!(form.contains("role=\"alert\""));
    }
}
