//! The outbox: reports written to a local folder when neither email nor Slack is configured, so
//! that a fresh installation keeps its reports somewhere a person can open them.
//!
//! Each message gets its own folder, named by the UTC time it was written and its subject:
//!
//! ```text
//! <outbox_dir>/20261125T080000Z-pictor-daily-report-2026-11-24/
//!     message.txt            Subject, date and the plain-text body
//!     message.html           the HTML body, to open in a browser
//!     slack.json             the Block Kit payload Slack would have got
//!     jobs-2026-11-24.csv    each attachment under its own (sanitised) file name
//! ```
//!
//! The folder is filled under a hidden `.<name>.partial` name and then renamed, so a reader
//! never sees a half-written report. Two messages with the same subject in the same second get
//! `-2`, `-3`, … suffixes rather than overwriting each other.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use super::{Message, Outcome};

/// File names of the rendered bodies; an attachment never takes one of them.
const RESERVED: [&str; 3] = ["message.txt", "message.html", "slack.json"];

/// Longest subject slug in a folder name.
const MAX_SLUG_CHARS: usize = 60;

pub(super) struct Outbox {
    dir: PathBuf,
}

impl Outbox {
    pub(super) fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub(super) async fn write(&self, message: &Message) -> Outcome {
        let dir = self.dir.clone();
        let message = message.clone();
        let written =
            tokio::task::spawn_blocking(move || write_message(&dir, &message, Utc::now())).await;
        match written {
            Ok(Ok(path)) => {
                tracing::info!(path = %path.display(), "Report written to the outbox");
                Outcome::Sent
            }
            Ok(Err(error)) => Outcome::transient(format!(
                "cannot write to the outbox {}: {error}",
                self.dir.display()
            )),
            Err(error) => Outcome::transient(format!("the outbox writer failed: {error}")),
        }
    }
}

/// Writes one message's folder and returns its path.
fn write_message(dir: &Path, message: &Message, now: DateTime<Utc>) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let name = format!(
        "{}-{}",
        now.format("%Y%m%dT%H%M%SZ"),
        slug(&message.subject)
    );
    let partial = dir.join(format!(".{name}.{}.partial", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir(&partial)?;
    let filled = fill(&partial, message, now).and_then(|()| publish(dir, &partial, &name));
    if filled.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    filled
}

fn fill(folder: &Path, message: &Message, now: DateTime<Utc>) -> io::Result<()> {
    let text = format!(
        "Subject: {}\nDate: {}\n\n{}\n",
        message.subject,
        now.to_rfc2822(),
        message.text.trim_end()
    );
    std::fs::write(folder.join("message.txt"), text)?;
    std::fs::write(folder.join("message.html"), &message.html)?;
    let slack = serde_json::json!({ "text": message.text, "blocks": message.slack_blocks });
    let slack = serde_json::to_vec_pretty(&slack).map_err(io::Error::other)?;
    std::fs::write(folder.join("slack.json"), slack)?;
    let mut taken: HashSet<String> = RESERVED.iter().map(|name| (*name).to_string()).collect();
    for (index, attachment) in message.attachments.iter().enumerate() {
        let mut name = file_name(&attachment.filename, index);
        if taken.contains(&name) {
            name = format!("{}-{name}", index + 1);
        }
        std::fs::write(folder.join(&name), &attachment.bytes)?;
        taken.insert(name);
    }
    Ok(())
}

/// Renames the filled folder to `name`, or `name-2`, `name-3`, … when taken.
fn publish(dir: &Path, partial: &Path, name: &str) -> io::Result<PathBuf> {
    for suffix in 1..1000 {
        let target = match suffix {
            1 => dir.join(name),
            _ => dir.join(format!("{name}-{suffix}")),
        };
        // rename(2) replaces an empty directory, so test for any entry first.
        if target.exists() {
            continue;
        }
        match std::fs::rename(partial, &target) {
            Ok(()) => return Ok(target),
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::AlreadyExists | io::ErrorKind::DirectoryNotEmpty
                ) => {}
            Err(error) => return Err(error),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("too many outbox folders named {name}"),
    ))
}

/// A lowercase ASCII slug of a subject: `Pictor daily report 2026-11-24` →
/// `pictor-daily-report-2026-11-24`.
fn slug(subject: &str) -> String {
    let mut slug = String::new();
    for character in subject.chars() {
        if character.is_ascii_alphanumeric() {
            slug.push(character.to_ascii_lowercase());
        } else if !slug.is_empty() && !slug.ends_with('-') {
            slug.push('-');
        }
        if slug.len() >= MAX_SLUG_CHARS {
            break;
        }
    }
    let slug = slug.trim_end_matches('-');
    if slug.is_empty() {
        "message".to_string()
    } else {
        slug.to_string()
    }
}

/// An attachment's file name made safe for the outbox: its last path component, with only
/// ASCII letters, digits, `.`, `-` and `_`, and no leading dot.
fn file_name(filename: &str, index: usize) -> String {
    let last = filename.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String = last
        .chars()
        .map(|character| {
            if character.is_ascii_alphanumeric() || matches!(character, '.' | '-' | '_') {
                character
            } else {
                '_'
            }
        })
        .collect();
    let cleaned = cleaned.trim_start_matches('.');
    if cleaned.is_empty() {
        format!("attachment-{}", index + 1)
    } else {
        cleaned.to_string()
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::super::Attachment;
    use super::super::tests::sample_message;
    use super::*;

    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Self {
            Self(std::env::temp_dir().join(format!(
                "pictor-outbox-test-{}",
                uuid::Uuid::new_v4().simple()
            )))
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            if std::fs::remove_dir_all(&self.0).is_err() {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn at(hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 25, hour, 0, 0).unwrap()
    }

    #[test]
    fn a_message_becomes_a_folder_of_files_a_person_can_open() {
        let scratch = Scratch::new();
        let message = sample_message();

        let folder = write_message(&scratch.0, &message, at(8)).unwrap();

        assert_eq!(
            folder,
            scratch
                .0
                .join("20261125T080000Z-pictor-daily-report-2026-11-24")
        );
        let text = std::fs::read_to_string(folder.join("message.txt")).unwrap();
        assert!(text.starts_with("Subject: Pictor daily report 2026-11-24\n"));
        assert!(text.contains("42 jobs, 2 failed"));
        assert_eq!(
            std::fs::read_to_string(folder.join("message.html")).unwrap(),
            message.html
        );
        let slack: serde_json::Value =
            serde_json::from_slice(&std::fs::read(folder.join("slack.json")).unwrap()).unwrap();
        assert_eq!(slack["blocks"], message.slack_blocks);
        assert_eq!(
            std::fs::read(folder.join("jobs-2026-11-24.csv")).unwrap(),
            message.attachments[0].bytes
        );
        let entries = std::fs::read_dir(&scratch.0).unwrap().count();
        assert_eq!(entries, 1, "no partial folder is left behind");
    }

    #[test]
    fn the_same_subject_in_the_same_second_does_not_overwrite() {
        let scratch = Scratch::new();
        let first = write_message(&scratch.0, &sample_message(), at(8)).unwrap();
        let second = write_message(&scratch.0, &sample_message(), at(8)).unwrap();
        assert_ne!(first, second);
        assert!(second.to_string_lossy().ends_with("-2"));
    }

    #[test]
    fn attachment_names_cannot_escape_the_folder_or_replace_the_bodies() {
        let scratch = Scratch::new();
        let mut message = sample_message();
        let attachment = |filename: &str| Attachment {
            filename: filename.to_string(),
            content_type: "text/plain".to_string(),
            bytes: bytes::Bytes::from(filename.to_string()),
        };
        message.attachments = vec![
            attachment("../../etc/passwd"),
            attachment("message.html"),
            attachment(".."),
        ];

        let folder = write_message(&scratch.0, &message, at(9)).unwrap();

        assert!(folder.join("passwd").exists());
        assert_eq!(
            std::fs::read_to_string(folder.join("message.html")).unwrap(),
            message.html
        );
        assert!(folder.join("2-message.html").exists());
        assert!(folder.join("attachment-3").exists());
    }

    #[test]
    fn subjects_become_short_ascii_slugs() {
        assert_eq!(
            slug("Pictor: budget 80% reached!"),
            "pictor-budget-80-reached"
        );
        assert_eq!(slug("  ¡¿  "), "message");
        assert!(slug(&"long words ".repeat(20)).len() <= MAX_SLUG_CHARS);
    }

    #[tokio::test]
    async fn an_unwritable_outbox_is_a_failure_not_a_panic() {
        let scratch = Scratch::new();
        std::fs::write(&scratch.0, b"a file where the folder should be").unwrap();
        let outcome = Outbox::new(scratch.0.clone())
            .write(&sample_message())
            .await;
        assert!(matches!(
            outcome,
            Outcome::Failed {
                permanent: false,
                ..
            }
        ));
    }
}
