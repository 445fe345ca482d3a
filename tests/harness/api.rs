//! The one HTTP client of the tests: [`request`] builds a call to a bridge
//! (or a worker's metrics port) with an optional token, headers and body;
//! [`Request::send`] answers its status, headers, text and envelope. Every
//! test file calls the routes through it, so a route's answer is read the
//! same way everywhere.

use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::Value;

/// A request being built.
#[must_use]
pub struct Request {
    method: Method,
    url: String,
    token: Option<String>,
    headers: Vec<(String, String)>,
    body: Option<String>,
}

/// What a route answered.
#[derive(Debug)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// The response headers.
    pub headers: HeaderMap,
    /// The body as text.
    pub text: String,
}

/// A `method` request to `url`, with no token, header or body yet.
pub fn request(method: Method, url: impl Into<String>) -> Request {
    Request {
        method,
        url: url.into(),
        token: None,
        headers: Vec::new(),
        body: None,
    }
}

/// A GET of `url`.
pub fn get(url: impl Into<String>) -> Request {
    request(Method::GET, url)
}

impl Request {
    /// Sends `token` as the bearer token (none when `None`).
    pub fn token(mut self, token: Option<&str>) -> Self {
        self.token = token.map(str::to_owned);
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sends `body` as it is, with no content type unless a header names one.
    pub fn body(mut self, body: &str) -> Self {
        self.body = Some(body.to_owned());
        self
    }

    /// Sends `value` as JSON, with its content type.
    pub fn json(self, value: &Value) -> Self {
        self.header("Content-Type", "application/json")
            .body(&value.to_string())
    }

    /// Sends it; `Err` when no answer came (refused, reset, timed out).
    pub async fn try_send(self) -> Result<Answer, reqwest::Error> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("an HTTP client");
        let mut request = client.request(self.method, &self.url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        if let Some(body) = self.body {
            request = request.body(body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await?;
        Ok(Answer {
            status,
            headers,
            text,
        })
    }

    /// Sends it, panicking when no answer came.
    pub async fn send(self) -> Answer {
        let url = self.url.clone();
        self.try_send()
            .await
            .unwrap_or_else(|e| panic!("{url}: no answer: {e}"))
    }

    /// Sends it and reads the BMW envelope: (status, envelope).
    pub async fn envelope(self) -> (u16, Value) {
        let answer = self.send().await;
        let envelope = answer.envelope();
        (answer.status, envelope)
    }
}

impl Answer {
    /// The body as JSON, panicking when it is not.
    pub fn envelope(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|_| panic!("not an envelope ({}): {}", self.status, self.text))
    }

    /// A response header, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}
