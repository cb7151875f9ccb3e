//! The email channel: one SMTP message per report, to every `scheduler.email_to` recipient.
//!
//! The message is `multipart/alternative` (plain text, then HTML, so a client shows the richest
//! part it can), wrapped in `multipart/mixed` with the attachments when there are any. The
//! transport comes from `scheduler.smtp_url` through lettre's URL parser: `smtp://host:port`
//! is plain SMTP, `smtp://…?tls=required` (or `opportunistic`) is STARTTLS and `smtps://` is
//! TLS from the first byte; credentials go in the URL's user and password. That URL holds the
//! password, so logs name the server only as `host:port`.
//!
//! Retries: SMTP 5xx replies (and errors lettre raises before talking, such as an address the
//! server cannot take) are permanent and end the attempt at once; connection and network
//! errors, timeouts and 4xx replies are retried with the shared backoff.

use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::AsyncSmtpTransportBuilder;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use secrecy::{ExposeSecret, SecretString};
use shared::retry::RetryPolicy;

use super::{DeliveryError, Message, Outcome, back_off};

/// Longest wait for the server on one connection step (connect, each command, the data).
const SMTP_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) struct Email {
    /// Holds the credentials. A transport is built from it for each message: lettre's pooled
    /// transport spawns a task when built and dropped, so building it here would tie
    /// `Delivery::from_settings` to a Tokio runtime, and a few reports a day gain nothing from
    /// keeping idle connections open.
    transport: AsyncSmtpTransportBuilder,
    from: Mailbox,
    to: Vec<Mailbox>,
    /// `host:port`, for logs.
    server: String,
    pub(super) retry: RetryPolicy,
}

impl Email {
    pub(super) fn new(
        url: &SecretString,
        from: &str,
        to: &[String],
        retry: RetryPolicy,
    ) -> Result<Self, DeliveryError> {
        // lettre's URL errors name the part that is wrong, never the URL itself.
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url.expose_secret())
            .map_err(|error| DeliveryError::SmtpUrl(error.to_string()))?
            .timeout(Some(SMTP_TIMEOUT));
        let from = from
            .parse::<Mailbox>()
            .map_err(|error| DeliveryError::EmailFrom {
                value: from.to_string(),
                reason: error.to_string(),
            })?;
        let to = to
            .iter()
            .map(|address| {
                address
                    .parse::<Mailbox>()
                    .map_err(|error| DeliveryError::EmailTo {
                        value: address.clone(),
                        reason: error.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let server = server_for_logs(url);
        tracing::info!(server = %server, recipients = to.len(), "Email reports are on");
        Ok(Self {
            transport,
            from,
            to,
            server,
            retry,
        })
    }

    pub(super) async fn send(&self, message: &Message) -> Outcome {
        let email = match self.compose(message) {
            Ok(email) => email,
            Err(error) => return Outcome::permanent(format!("cannot build the email: {error}")),
        };
        let transport: AsyncSmtpTransport<Tokio1Executor> = self.transport.clone().build();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let error = match transport.send(email.clone()).await {
                Ok(_) => return Outcome::Sent,
                Err(error) => error,
            };
            if is_permanent(&error) {
                return Outcome::permanent(error.to_string());
            }
            if !self.retry.allows_another(attempts) {
                return Outcome::transient(format!("{error} (gave up after {attempts} attempts)"));
            }
            tracing::warn!(
                server = %self.server,
                attempt = attempts,
                error = %error,
                "Email attempt failed, retrying"
            );
            back_off(&self.retry, attempts - 1, None).await;
        }
    }

    fn compose(&self, message: &Message) -> Result<lettre::Message, lettre::error::Error> {
        let mut builder = lettre::Message::builder()
            .from(self.from.clone())
            .subject(message.subject.clone());
        for recipient in &self.to {
            builder = builder.to(recipient.clone());
        }
        let body = MultiPart::alternative_plain_html(message.text.clone(), message.html.clone());
        if message.attachments.is_empty() {
            return builder.multipart(body);
        }
        let mixed = message.attachments.iter().fold(
            MultiPart::mixed().multipart(body),
            |mixed, attachment| {
                let content_type =
                    ContentType::parse(&attachment.content_type).unwrap_or_else(|_| {
                        ContentType::parse("application/octet-stream").expect("a valid MIME type")
                    });
                mixed.singlepart(
                    lettre::message::Attachment::new(attachment.filename.clone())
                        .body(attachment.bytes.to_vec(), content_type),
                )
            },
        );
        builder.multipart(mixed)
    }
}

/// Whether retrying cannot help: a 5xx reply, or an error lettre raised itself (such as a
/// non-ASCII address the server cannot take, or no usable authentication mechanism).
fn is_permanent(error: &lettre::transport::smtp::Error) -> bool {
    error.is_permanent() || error.is_client()
}

/// `host:port` of an SMTP URL, with lettre's default ports, and never its credentials.
pub(super) fn server_for_logs(url: &SecretString) -> String {
    let Ok(url) = reqwest::Url::parse(url.expose_secret()) else {
        return "(unparsable smtp_url)".to_string();
    };
    let tls = url
        .query_pairs()
        .find_map(|(key, value)| (key == "tls").then(|| value.into_owned()));
    let default_port = match (url.scheme(), tls.as_deref()) {
        ("smtps", _) => 465,
        ("smtp", Some(_)) => 587,
        _ => 25,
    };
    format!(
        "{}:{}",
        url.host_str().unwrap_or("?"),
        url.port().unwrap_or(default_port)
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    use super::super::tests::{fast_retry, sample_message};
    use super::*;

    /// A scripted SMTP server: enough of RFC 5321 for lettre, answering each `RCPT TO` with the
    /// next of `rcpt_replies` (then `250`) and counting `MAIL FROM` commands, i.e. attempts.
    struct FakeSmtp {
        port: u16,
        mail_commands: Arc<AtomicUsize>,
        delivered: Arc<AtomicUsize>,
        server: tokio::task::JoinHandle<()>,
    }

    impl FakeSmtp {
        async fn start(rcpt_replies: &[&str]) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let mail_commands = Arc::new(AtomicUsize::new(0));
            let delivered = Arc::new(AtomicUsize::new(0));
            let replies = Arc::new(std::sync::Mutex::new(
                rcpt_replies
                    .iter()
                    .map(|reply| (*reply).to_string())
                    .collect::<std::collections::VecDeque<_>>(),
            ));
            let server = tokio::spawn({
                let mail_commands = mail_commands.clone();
                let delivered = delivered.clone();
                async move {
                    while let Ok((stream, _)) = listener.accept().await {
                        tokio::spawn(serve(
                            stream,
                            replies.clone(),
                            mail_commands.clone(),
                            delivered.clone(),
                        ));
                    }
                }
            });
            Self {
                port,
                mail_commands,
                delivered,
                server,
            }
        }
    }

    impl Drop for FakeSmtp {
        fn drop(&mut self) {
            self.server.abort();
        }
    }

    async fn serve(
        stream: tokio::net::TcpStream,
        replies: Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
        mail_commands: Arc<AtomicUsize>,
        delivered: Arc<AtomicUsize>,
    ) {
        let (reader, mut writer) = stream.into_split();
        let mut lines = BufReader::new(reader).lines();
        let _ = writer.write_all(b"220 fake ESMTP\r\n").await;
        let mut in_data = false;
        while let Ok(Some(line)) = lines.next_line().await {
            if in_data {
                if line == "." {
                    in_data = false;
                    delivered.fetch_add(1, Ordering::SeqCst);
                    let _ = writer.write_all(b"250 2.0.0 queued\r\n").await;
                }
                continue;
            }
            let command = line.to_ascii_uppercase();
            let reply = if command.starts_with("EHLO") || command.starts_with("HELO") {
                "250 fake".to_string()
            } else if command.starts_with("MAIL FROM") {
                mail_commands.fetch_add(1, Ordering::SeqCst);
                "250 2.1.0 ok".to_string()
            } else if command.starts_with("RCPT TO") {
                let scripted = replies.lock().unwrap().pop_front();
                scripted.unwrap_or_else(|| "250 2.1.5 ok".to_string())
            } else if command == "DATA" {
                in_data = true;
                "354 go ahead".to_string()
            } else if command == "QUIT" {
                let _ = writer.write_all(b"221 bye\r\n").await;
                return;
            } else {
                "250 ok".to_string()
            };
            if writer
                .write_all(format!("{reply}\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    }

    fn email_to(port: u16, retry: RetryPolicy) -> Email {
        Email::new(
            &SecretString::from(format!("smtp://127.0.0.1:{port}")),
            "Pictor <pictor@localhost>",
            &["ops@example.com".to_string()],
            retry,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_rejected_recipient_is_a_permanent_failure_without_retries() {
        let smtp = FakeSmtp::start(&["550 5.1.1 mailbox unavailable"]).await;
        let outcome = email_to(smtp.port, fast_retry(4))
            .send(&sample_message())
            .await;
        let Outcome::Failed { permanent, error } = outcome else {
            panic!("expected a failure, got {outcome:?}");
        };
        assert!(permanent);
        assert!(error.contains("550"), "{error}");
        assert_eq!(smtp.mail_commands.load(Ordering::SeqCst), 1);
        assert_eq!(smtp.delivered.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_transient_smtp_reply_is_retried_until_the_message_goes_through() {
        let smtp = FakeSmtp::start(&["451 4.3.0 try again later", "421 4.7.0 busy"]).await;
        let outcome = email_to(smtp.port, fast_retry(4))
            .send(&sample_message())
            .await;
        assert_eq!(outcome, Outcome::Sent);
        assert_eq!(smtp.mail_commands.load(Ordering::SeqCst), 3);
        assert_eq!(smtp.delivered.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_unreachable_server_is_a_transient_failure_after_every_attempt() {
        // Bind then drop: nothing listens on the port any more, so connecting is refused.
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let outcome = email_to(port, fast_retry(3)).send(&sample_message()).await;
        let Outcome::Failed { permanent, error } = outcome else {
            panic!("expected a failure, got {outcome:?}");
        };
        assert!(!permanent);
        assert!(error.contains("after 3 attempts"), "{error}");
    }

    #[test]
    fn the_email_has_text_html_and_the_attachment() {
        let email = email_to(25, fast_retry(1));
        let formatted =
            String::from_utf8(email.compose(&sample_message()).unwrap().formatted()).unwrap();
        assert!(formatted.contains("Subject: Pictor daily report 2026-11-24"));
        assert!(formatted.contains("To: ops@example.com"));
        assert!(formatted.contains("multipart/mixed"));
        assert!(formatted.contains("multipart/alternative"));
        assert!(formatted.contains("text/plain"));
        assert!(formatted.contains("text/html"));
        assert!(formatted.contains("filename=\"jobs-2026-11-24.csv\""));
    }

    #[test]
    fn an_unparsable_attachment_type_falls_back_to_octet_stream() {
        let email = email_to(25, fast_retry(1));
        let mut message = sample_message();
        message.attachments[0].content_type = "not a type".to_string();
        let formatted = String::from_utf8(email.compose(&message).unwrap().formatted()).unwrap();
        assert!(
            formatted.contains("application/octet-stream"),
            "{formatted}"
        );
    }

    #[test]
    fn logs_name_the_server_but_never_the_credentials() {
        let url = SecretString::from("smtp://pictor:hunter2@mail.example.com?tls=required");
        assert_eq!(server_for_logs(&url), "mail.example.com:587");
        let url = SecretString::from("smtps://pictor:hunter2@mail.example.com:2465");
        assert_eq!(server_for_logs(&url), "mail.example.com:2465");
    }
}
