"""The registration token: minted locally by quantix-nodectl, checked in constant time."""

from __future__ import annotations

import io
import json
import os
import re
import stat

from twisted.trial import unittest

from quantix.ops import nodectl, regtoken


class TokenTests(unittest.TestCase):
    def setUp(self):
        self.state = self.mktemp()

    def test_format(self):
        for _ in range(50):
            self.assertRegex(regtoken.new_token_text(), r"^QUANTIX-[A-Z2-7]{4}-[A-Z2-7]{4}-[A-Z2-7]{4}$")

    def test_mint_check_expire(self):
        with self.assertRaises(regtoken.NoToken) as caught:
            regtoken.check(self.state, "QUANTIX-AAAA-AAAA-AAAA")
        self.assertEqual((caught.exception.code, caught.exception.status), ("no_token", 404))
        tok = regtoken.mint(self.state, now=lambda: 1000.0)
        self.assertEqual((tok.created_at, tok.expires_at), (1000.0, 4600.0))
        path = os.path.join(self.state, regtoken.FILE_NAME)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(regtoken.check(self.state, tok.token, now=lambda: 4599.0), tok)
        for wrong in (None, "", tok.token.lower(), tok.token + "X", "QUANTIX-AAAA-AAAA-AAAA", "é"):
            with self.assertRaises(regtoken.InvalidToken) as caught:
                regtoken.check(self.state, wrong, now=lambda: 2000.0)
            self.assertEqual((caught.exception.code, caught.exception.status), ("invalid_token", 401))
        with self.assertRaises(regtoken.TokenExpired) as caught:
            regtoken.check(self.state, tok.token, now=lambda: 4600.0)
        self.assertEqual(caught.exception.code, "token_expired")
        self.assertIn("expired", str(caught.exception))
        self.assertEqual(tok.expires_in(4000.0), 600)

    def test_new_mint_replaces_and_remove_revokes(self):
        old = regtoken.mint(self.state)
        new = regtoken.mint(self.state)
        with self.assertRaises(regtoken.InvalidToken):
            regtoken.check(self.state, old.token)
        regtoken.check(self.state, new.token)
        regtoken.remove(self.state)
        regtoken.remove(self.state)
        with self.assertRaises(regtoken.NoToken):
            regtoken.check(self.state, new.token)

    def test_unreadable_file_is_no_token(self):
        os.makedirs(self.state)
        with open(os.path.join(self.state, regtoken.FILE_NAME), "w") as fh:
            fh.write("{not json")
        self.assertIsNone(regtoken.current(self.state))

    def test_bearer(self):
        self.assertEqual(regtoken.bearer("Bearer QUANTIX-A"), "QUANTIX-A")
        self.assertEqual(regtoken.bearer(b"bearer   QUANTIX-A "), "QUANTIX-A")
        for bad in (None, "", "Basic abc", "Bearer", "Bearer  "):
            self.assertIsNone(regtoken.bearer(bad))


class NodectlTokenTests(unittest.TestCase):
    def run_ctl(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = nodectl.main(list(argv), stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    def test_mints_into_the_state_dir(self):
        state = self.mktemp()
        code, out, _ = self.run_ctl("registration-token", "--state-dir", state)
        self.assertEqual(code, 0)
        token = out.splitlines()[0]
        self.assertRegex(token, r"^QUANTIX-")
        self.assertIn("valid until", out)
        regtoken.check(state, token)

    def test_json_and_state_dir_from_config(self):
        state = self.mktemp()
        config = self.mktemp()
        with open(config, "w") as fh:
            fh.write(f"state_dir: {state}\n")
        code, out, _ = self.run_ctl("--json", "registration-token", "--config", config)
        self.assertEqual(code, 0)
        body = json.loads(out)
        self.assertTrue(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", body["expiresAt"]))
        regtoken.check(state, body["token"])

    def test_bad_config_is_a_usage_error(self):
        code, _, err = self.run_ctl("registration-token", "--config", "/nonexistent/node.yaml")
        self.assertEqual(code, nodectl.EXIT_USAGE)
        self.assertIn("/nonexistent/node.yaml", err)
