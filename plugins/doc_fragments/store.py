# Copyright: (c) 2026, modulus contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Options to reach an archive store (S3 or S3-compatible, a directory, or a read-only mirror).

The S3 connection options follow the names of amazon.aws (``access_key``, ``secret_key``,
``session_token``, ``profile``, ``endpoint_url``, ``region``, ``validate_certs``, ``aws_ca_bundle``)."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  store:
    description:
      - Where builds are shared.
      - V(s3://bucket/prefix) is any S3 or S3-compatible object store (see O(endpoint_url)).
      - V(file:///dir) is a local or shared directory (for example an NFS mount).
      - V(https://host/path) or V(http://host/path) is a read-only mirror or public bucket, read with
        unauthenticated GET requests. It cannot receive builds nor hold a lock.
      - When not set, nothing leaves the host and nothing is fetched.
    type: str
  endpoint_url:
    description:
      - URL of an S3-compatible endpoint to use instead of AWS (MinIO, Ceph RGW, moto...).
      - Only for O(store=s3://...).
    type: str
    aliases: [aws_endpoint_url]
  access_key:
    description:
      - AWS access key ID.
      - When not set, boto3 looks for credentials itself (the E(AWS_ACCESS_KEY_ID) environment,
        O(profile), an instance role).
    type: str
    aliases: [aws_access_key_id, aws_access_key]
  secret_key:
    description:
      - AWS secret access key. Never shown in output.
    type: str
    aliases: [aws_secret_access_key, aws_secret_key]
  session_token:
    description:
      - AWS STS session token for temporary credentials. Never shown in output.
    type: str
    aliases: [aws_session_token]
  profile:
    description:
      - A named profile of the AWS configuration files on the managed host.
    type: str
    aliases: [aws_profile]
  region:
    description:
      - The AWS region of the bucket. Most S3-compatible stores accept any value.
    type: str
    aliases: [aws_region]
  validate_certs:
    description:
      - Verify the TLS certificate of the store. Consider O(aws_ca_bundle) before turning this off.
    type: bool
    default: true
  aws_ca_bundle:
    description:
      - A CA bundle used to verify the store's certificate.
    type: path
  addressing_style:
    description:
      - How the bucket is addressed. V(path) (C(https://endpoint/bucket/key)) is what most
        S3-compatible stores need; V(virtual) puts the bucket in the host name; V(auto) lets botocore decide.
    type: str
    choices: [auto, path, virtual]
    default: auto
  encryption:
    description:
      - Server-side encryption of uploaded archives and leases.
    type: str
    choices: [AES256, 'aws:kms']
  encryption_kms_key_id:
    description:
      - The KMS key for O(encryption=aws:kms) (the bucket's default key when not set).
    type: str
  request_checksum_calculation:
    description:
      - When botocore adds CRC checksums to uploads. Many S3-compatible stores reject the newer
        checksum headers, set V(when_required) for them.
    type: str
    choices: [when_supported, when_required]
  response_checksum_validation:
    description:
      - When botocore validates checksums of downloads. V(when_required) for stores that send none.
    type: str
    choices: [when_supported, when_required]
  connect_timeout:
    description:
      - Seconds to wait for a connection to the store (reads wait at least 60 seconds).
    type: int
    default: 10
  max_attempts:
    description:
      - Attempts per S3 request, retries included (botocore's standard retry mode).
    type: int
    default: 3
requirements:
  - boto3 (only for O(store=s3://...))
notes:
  - Credentials and configuration files are read on the managed host, not on the controller.
"""
