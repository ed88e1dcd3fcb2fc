//! The image catalogue: what a reimage can write, in the one form it is served in.
//!
//! Building the served file (conversion, compression, digests) is the provisioner's work; the
//! store holds the row that makes an image exist, and refuses to remove one that a host or a
//! running reimage uses.

use serde::Serialize;
use sqlx::any::AnyRow;

use crate::db::{get, parse_column};
use crate::error::{query, Result, StoreError};
use crate::events::{insert_event, NewEvent};
use crate::types::Timestamp;
use crate::Store;

/// The format an image was added in (it is served as zstd-compressed raw whatever it was).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// A raw disk image.
    Raw,
    /// QEMU's copy-on-write format (converted with `qemu-img`).
    Qcow2,
    /// A raw image compressed with zstd.
    Zstd,
    /// A raw image compressed with gzip.
    Gzip,
    /// A raw image compressed with xz.
    Xz,
}

impl ImageFormat {
    /// Every format, in the order the help lists them.
    pub const ALL: [ImageFormat; 5] =
        [ImageFormat::Raw, ImageFormat::Qcow2, ImageFormat::Zstd, ImageFormat::Gzip, ImageFormat::Xz];

    /// The database and CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Zstd => "zstd",
            ImageFormat::Gzip => "gzip",
            ImageFormat::Xz => "xz",
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = crate::ParseError;
    fn from_str(s: &str) -> std::result::Result<ImageFormat, crate::ParseError> {
        ImageFormat::ALL.into_iter().find(|f| f.as_str() == s).ok_or_else(|| crate::ParseError {
            what: "image format",
            value: s.to_owned(),
            reason: "one of raw, qcow2, zstd, gzip, xz",
        })
    }
}

/// A catalogue entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Image {
    /// Its name (`reimage --image NAME`).
    pub name: String,
    /// The format it was added in.
    pub source_format: ImageFormat,
    /// The served file (zstd-compressed raw), relative to `images_dir`.
    pub file: String,
    /// Bytes of the raw disk image.
    pub raw_size: u64,
    /// sha256 (hex) of the raw disk image.
    pub raw_sha256: String,
    /// Bytes of the served file.
    pub served_size: u64,
    /// sha256 (hex) of the served file: its HTTP `ETag`, what the deploy agent checks.
    pub served_sha256: String,
    /// Bytes of the raw image outside all-zero 64 KiB blocks: what a zero-aware write writes.
    pub data_bytes: u64,
    /// When it was added.
    pub created_at: Timestamp,
    /// When a reimage last started with it.
    pub last_used_at: Option<Timestamp>,
}

/// What `image add` made, to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewImage {
    /// See [`Image`].
    pub name: String,
    /// See [`Image`].
    pub source_format: ImageFormat,
    /// See [`Image`].
    pub file: String,
    /// See [`Image`].
    pub raw_size: u64,
    /// See [`Image`].
    pub raw_sha256: String,
    /// See [`Image`].
    pub served_size: u64,
    /// See [`Image`].
    pub served_sha256: String,
    /// See [`Image`].
    pub data_bytes: u64,
}

/// Checks a catalogue name: 1–64 of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-` (it
/// becomes part of a file name and of a URL).
pub fn check_image_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!("image name {name:?}: 1 to 64 of A-Z a-z 0-9 . _ -, not starting with . or -")))
    }
}

const COLUMNS: &str = "name, source_format, file, raw_size, raw_sha256, served_size, served_sha256, data_bytes, \
                       created_at, last_used_at";

fn size(row: &AnyRow, column: &str) -> Result<u64> {
    let v: i64 = get(row, "images", column)?;
    u64::try_from(v).map_err(|_| StoreError::Corrupt { table: "images", reason: format!("{column} is {v}") })
}

fn from_row(row: &AnyRow) -> Result<Image> {
    const T: &str = "images";
    Ok(Image {
        name: get(row, T, "name")?,
        source_format: parse_column(T, "source_format", &get::<String>(row, T, "source_format")?)?,
        file: get(row, T, "file")?,
        raw_size: size(row, "raw_size")?,
        raw_sha256: get(row, T, "raw_sha256")?,
        served_size: size(row, "served_size")?,
        served_sha256: get(row, T, "served_sha256")?,
        data_bytes: size(row, "data_bytes")?,
        created_at: Timestamp(get(row, T, "created_at")?),
        last_used_at: get::<Option<i64>>(row, T, "last_used_at")?.map(Timestamp),
    })
}

fn db_size(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| StoreError::Invalid(format!("{v} bytes is too large")))
}

impl Store {
    /// Records a catalogue image (its served file must already be in place). Refused with
    /// [`StoreError::ImageExists`] when the name is taken: nothing is written.
    pub async fn add_image(&self, new: &NewImage, actor: &str) -> Result<Image> {
        const WHAT: &str = "adding an image";
        check_image_name(&new.name)?;
        let now = self.now().await?.0;
        let mut tx = self.begin_write(WHAT).await?;
        let taken: Option<String> = sqlx::query_scalar("SELECT name FROM images WHERE name = $1")
            .bind(&new.name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(query(WHAT))?;
        if taken.is_some() {
            return Err(StoreError::ImageExists(new.name.clone()));
        }
        let inserted = sqlx::query(
            "INSERT INTO images (name, source_format, file, raw_size, raw_sha256, served_size, served_sha256, \
             data_bytes, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&new.name)
        .bind(new.source_format.as_str())
        .bind(&new.file)
        .bind(db_size(new.raw_size)?)
        .bind(&new.raw_sha256)
        .bind(db_size(new.served_size)?)
        .bind(&new.served_sha256)
        .bind(db_size(new.data_bytes)?)
        .bind(now)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            // A concurrent add of the same name won (PostgreSQL: both read "free").
            Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                return Err(StoreError::ImageExists(new.name.clone()))
            }
            Err(e) => return Err(StoreError::Query { what: WHAT, source: e }),
        }
        let message = format!(
            "image {} added from {} ({} raw, {} served, sha256 {})",
            new.name, new.source_format, new.raw_size, new.served_size, new.raw_sha256
        );
        insert_event(&mut tx, &NewEvent::cell(actor, "image.added", message)).await?;
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM images WHERE name = $1"))
            .bind(&new.name)
            .fetch_one(&mut *tx)
            .await
            .map_err(query(WHAT))?;
        let image = from_row(&row)?;
        tx.commit().await.map_err(query(WHAT))?;
        Ok(image)
    }

    /// The catalogue, by name.
    pub async fn images(&self) -> Result<Vec<Image>> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM images ORDER BY name"))
            .fetch_all(&self.pool)
            .await
            .map_err(query("listing images"))?;
        rows.iter().map(from_row).collect()
    }

    /// One catalogue image, if there is one of that name.
    pub async fn image(&self, name: &str) -> Result<Option<Image>> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM images WHERE name = $1"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(query("reading an image"))?;
        row.as_ref().map(from_row).transpose()
    }

    /// Removes a catalogue image's row and returns it (the caller deletes its file after).
    /// Refused with [`StoreError::ImageInUse`] while a running operation writes it or a host
    /// was installed with it: nothing is removed. The row is deleted first, so a concurrent
    /// [`Store::start_operation_using`] waits for this transaction and then finds no image.
    pub async fn remove_image(&self, name: &str, actor: &str) -> Result<Image> {
        const WHAT: &str = "removing an image";
        let mut tx = self.begin_write(WHAT).await?;
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM images WHERE name = $1"))
            .bind(name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(query(WHAT))?
            .ok_or_else(|| StoreError::UnknownImage(name.to_owned()))?;
        let image = from_row(&row)?;
        sqlx::query("DELETE FROM images WHERE name = $1").bind(name).execute(&mut *tx).await.map_err(query(WHAT))?;
        let ops: Vec<(i64, String, String)> = sqlx::query_as(
            "SELECT id, kind, target FROM operations WHERE image = $1 AND status = 'running' ORDER BY id",
        )
        .bind(name)
        .fetch_all(&mut *tx)
        .await
        .map_err(query(WHAT))?;
        let hosts: Vec<String> = sqlx::query_scalar("SELECT name FROM hosts WHERE image = $1 ORDER BY name")
            .bind(name)
            .fetch_all(&mut *tx)
            .await
            .map_err(query(WHAT))?;
        let mut by = Vec::new();
        if !ops.is_empty() {
            let list: Vec<String> = ops.iter().map(|(id, kind, target)| format!("{kind} of {target} ({id})")).collect();
            by.push(format!("running {}", list.join(", ")));
        }
        if !hosts.is_empty() {
            by.push(format!("installed on {} (reimage them with another image first)", hosts.join(", ")));
        }
        if !by.is_empty() {
            return Err(StoreError::ImageInUse { name: name.to_owned(), by: by.join("; ") });
        }
        insert_event(&mut tx, &NewEvent::cell(actor, "image.removed", format!("image {name} removed"))).await?;
        tx.commit().await.map_err(query(WHAT))?;
        Ok(image)
    }
}
