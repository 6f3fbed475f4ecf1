"""The 8443 listener's self-signed certificate: generated once, reused, replaced when unusable."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.trial import unittest

from quantix.ops import selfsigned


class SelfSignedTests(unittest.TestCase):
    def setUp(self):
        self.state = self.mktemp()

    def load(self, paths: selfsigned.CertPaths) -> x509.Certificate:
        with open(paths.cert, "rb") as fh:
            return x509.load_pem_x509_certificate(fh.read())

    def test_generated_once_with_san_and_reused(self):
        first = selfsigned.ensure(self.state, "node-a.example", ["192.0.2.10", "not-an-ip"])
        self.assertTrue(first.generated)
        cert = self.load(first)
        self.assertIsInstance(cert.public_key(), ec.EllipticCurvePublicKey)
        self.assertEqual(cert.public_key().curve.name, "secp256r1")
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["node-a.example"])
        self.assertEqual(san.get_values_for_type(x509.IPAddress), [ipaddress.ip_address("192.0.2.10")])
        self.assertEqual(stat.S_IMODE(os.stat(first.key).st_mode), 0o600)
        self.assertEqual(os.path.dirname(first.cert), os.path.join(self.state, "https"))

        again = selfsigned.ensure(self.state, "renamed", ["192.0.2.99"])
        self.assertFalse(again.generated)
        self.assertEqual(self.load(again).serial_number, cert.serial_number)

    def test_corrupt_or_mismatched_pair_is_replaced(self):
        first = selfsigned.ensure(self.state, "h", ["192.0.2.1"])
        with open(first.key, "w") as fh:
            fh.write("garbage")
        self.assertTrue(selfsigned.ensure(self.state, "h", ["192.0.2.1"]).generated)
        _, other_key = selfsigned.generate("h", [])
        with open(first.key, "wb") as fh:
            fh.write(other_key)
        self.assertTrue(selfsigned.ensure(self.state, "h", ["192.0.2.1"]).generated)

    def test_expiring_certificate_is_replaced(self):
        selfsigned.ensure(self.state, "h", [])
        later = datetime.datetime.now(datetime.UTC) + selfsigned.VALIDITY - datetime.timedelta(days=10)
        self.assertTrue(selfsigned.ensure(self.state, "h", [], now=later).generated)
