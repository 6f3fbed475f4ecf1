"""Configuration: precedence, errors that name file and key, the shipped example."""

from __future__ import annotations

import os

from twisted.trial import unittest

from quantix import config as cfg
from quantix import configspec
from quantix.plugin import Options, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "etc", "limiquantix", "node.yaml")


class ConfigTests(unittest.TestCase):
    def write(self, text: str) -> str:
        path = self.mktemp() + ".yaml"
        with open(path, "w") as fh:
            fh.write(text)
        return path

    def options(self, *argv: str) -> Options:
        opts = Options()
        opts.parseOptions(list(argv))
        return opts

    def test_defaults(self):
        c = cfg.load(None, environ={})
        self.assertEqual(c.listen_address, "0.0.0.0:9090")
        self.assertEqual(c.hypervisor.uri, "qemu:///system")
        self.assertEqual(c.hypervisor.event_loop, "thread")
        self.assertEqual(c.state_dir, "/var/lib/quantix")
        self.assertEqual(c.agent.socket_dir, "/var/run/quantix-kvm/vms")
        self.assertFalse(c.auto_register)

    def test_precedence_file_env_flags(self):
        path = self.write(
            "listen_address: 10.0.0.1:9000\n"
            "hypervisor:\n  uri: qemu:///session\n"
            "state_dir: /srv/file\n"
            "agent:\n  socket_dir: /srv/agents\n"
        )
        env = {"QUANTIX_STATE_DIR": "/srv/env", "QUANTIX_HYPERVISOR_URI": "test:///default"}
        c = load_config(self.options("--config", path, "--libvirt-uri", "qemu+tcp://h/system"), environ=env)
        self.assertEqual(c.listen_address, "10.0.0.1:9000")  # file beats default
        self.assertEqual(c.state_dir, "/srv/env")  # env beats file
        self.assertEqual(c.hypervisor.uri, "qemu+tcp://h/system")  # given flag beats env
        self.assertEqual(c.agent.socket_dir, "/srv/agents")

    def test_flag_default_never_overrides_file(self):
        path = self.write("listen_address: 10.0.0.1:9000\nauto_register: true\n")
        c = load_config(self.options("--config", path), environ={})
        self.assertEqual(c.listen_address, "10.0.0.1:9000")
        self.assertTrue(c.auto_register)

    def test_register_flag(self):
        c = load_config(self.options("--register"), environ={})
        self.assertTrue(c.auto_register)

    def test_missing_default_file_is_fine_but_explicit_is_not(self):
        opts = Options()
        opts.parseOptions([])
        self.assertEqual(load_config(opts, environ={}).listen_address, "0.0.0.0:9090")
        with self.assertRaises(cfg.ConfigError) as caught:
            load_config(self.options("--config", "/nonexistent/node.yaml"), environ={})
        self.assertIn("/nonexistent/node.yaml", str(caught.exception))

    def test_bad_yaml_names_file_and_line(self):
        path = self.write("listen_address: [unclosed\n")
        with self.assertRaises(cfg.ConfigError) as caught:
            cfg.load(path, environ={})
        self.assertIn(path, str(caught.exception))
        self.assertIn("line", str(caught.exception))

    def test_bad_address_names_key(self):
        path = self.write("listen_address: nonsense\n")
        with self.assertRaises(cfg.ConfigError) as caught:
            cfg.load(path, environ={})
        self.assertIn(f"{path}: key listen_address", str(caught.exception))

    def test_unknown_hypervisor_type_names_key(self):
        path = self.write("hypervisor:\n  type: xen\n")
        with self.assertRaises(cfg.ConfigError) as caught:
            cfg.load(path, environ={})
        self.assertIn("hypervisor.type", str(caught.exception))
        self.assertIn("xen", str(caught.exception))

    def test_bad_env_value_names_variable(self):
        with self.assertRaises(cfg.ConfigError) as caught:
            cfg.load(None, environ={"QUANTIX_SERVER_MAX_WORKERS": "many"})
        self.assertIn("QUANTIX_SERVER_MAX_WORKERS", str(caught.exception))

    def test_bad_flag_names_flag(self):
        with self.assertRaises(cfg.ConfigError) as caught:
            load_config(self.options("--listen", "nope"), environ={})
        self.assertIn("--listen", str(caught.exception))

    def test_unknown_keys_warn(self):
        path = self.write("colour: blue\nhypervisor:\n  flavour: x\n")
        warnings: list[str] = []
        cfg.load(path, environ={}, warnings=warnings)
        self.assertEqual(len(warnings), 2)
        self.assertIn("colour", warnings[0] + warnings[1])
        self.assertIn("hypervisor.flavour", warnings[0] + warnings[1])

    def test_example_loads_cleanly(self):
        warnings: list[str] = []
        c = cfg.load(EXAMPLE, path_explicit=True, environ={}, warnings=warnings)
        self.assertEqual(warnings, [])
        self.assertEqual(c.listen_address, "0.0.0.0:9090")

    def test_example_documents_every_key(self):
        import attrs
        import yaml

        with open(EXAMPLE) as fh:
            data = yaml.safe_load(fh)
        for field in attrs.fields(cfg.Config):
            self.assertIn(field.name, data)
            if attrs.has(field.type):
                for sub in attrs.fields(field.type):
                    self.assertIn(sub.name, data[field.name], f"{field.name}.{sub.name}")

    def test_unix_socket_address(self):
        c = cfg.build({"listen_address": ("unix:/run/quantix/grpc.sock", "test")})
        self.assertEqual(c.listen_address, "unix:/run/quantix/grpc.sock")
        with self.assertRaises(cfg.ConfigError):
            cfg.build({"listen_address": ("unix:", "test")})

    def test_list_values(self):
        c = cfg.build({"migration.shared_paths": (["/mnt/a", "/mnt/b"], "test")})
        self.assertEqual(c.migration.shared_paths, ["/mnt/a", "/mnt/b"])
        with self.assertRaises(cfg.ConfigError):
            cfg.build({"migration.shared_paths": ({"a": 1}, "test")})
        with self.assertRaises(cfg.ConfigError):
            cfg.build({"migration.uri_template": ("qemu+tls://node/system", "test")})

    def test_ipv6_address(self):
        self.assertEqual(cfg.parse_address("[::1]:9090"), ("::1", 9090))
        with self.assertRaises(ValueError):
            cfg.parse_address("host:99999")

    def test_https_section(self):
        c = cfg.load(None, environ={})
        self.assertEqual(c.https.listen, "0.0.0.0:8443")
        self.assertEqual(c.https.allowed_clients, [])
        path = self.write(
            "https:\n  listen: null\n  allowed_clients: ['10.0.0.0/24', 192.0.2.7]\n"
            "agent:\n  binary_path: /a\n"
        )
        c = cfg.load(path, environ={})
        self.assertIsNone(c.https.listen)
        self.assertEqual(c.https.allowed_clients, ["10.0.0.0/24", "192.0.2.7"])
        self.assertEqual(c.agent.binary_path, "/a")
        c = cfg.load(None, environ={"QUANTIX_HTTPS_ALLOWED_CLIENTS": "10.1.0.0/16, ::1"})
        self.assertEqual(c.https.allowed_clients, ["10.1.0.0/16", "::1"])

    def test_https_bad_values_name_the_key(self):
        for text, key in (
            ("https:\n  allowed_clients: [10.0.0.300]\n", "https.allowed_clients"),
            ("https:\n  allowed_clients: {a: b}\n", "https.allowed_clients"),
            ("https:\n  listen: nowhere\n", "https.listen"),
            ("https:\n  cert: /a.pem\n", "https.cert"),
        ):
            with self.assertRaises(cfg.ConfigError) as caught:
                cfg.load(self.write(text), environ={})
            self.assertIn(key, str(caught.exception))


def example_keys() -> list[str]:
    """Every key of the shipped node.yaml, dotted (``events.buffer_size``)."""
    import yaml

    with open(EXAMPLE) as fh:
        data = yaml.safe_load(fh)
    sections = cfg._sections()
    keys = []
    for key, value in data.items():
        if key in sections:
            keys.extend(f"{key}.{sub}" for sub in value)
        else:
            keys.append(key)
    return keys


def field_of(key: str):
    import attrs

    section, _, sub = key.partition(".")
    top = attrs.fields_dict(cfg.Config)[section]
    return attrs.fields_dict(top.type)[sub] if sub else top


MISSING_SPEC = (
    "node.yaml keys declared without a type and range: {keys}. Declare each with a field helper "
    "of quantix.configspec in quantix/config.py (integer(default, min=, max=), number(...), "
    "boolean(), choice(default, choices), text(...), path(), address(), ip(), url(), table(), "
    "items(); or field(YourSpec(...), default) for a new kind) so this walk can check it."
)


class EveryKeyTests(unittest.TestCase):
    """Walk every key of etc/limiquantix/node.yaml with a value of the wrong type and with every
    out-of-range value its declared spec offers: each must stop the load with a ConfigError that
    names the file and the key. Keys added later are walked the same way."""

    def load_with(self, key: str, value) -> str:
        import yaml

        section, _, sub = key.partition(".")
        data = {section: {sub: value}} if sub else {key: value}
        path = self.mktemp() + ".yaml"
        with open(path, "w") as fh:
            yaml.safe_dump(data, fh)
        with self.assertRaises(cfg.ConfigError, msg=f"{key}: {value!r} was accepted") as caught:
            cfg.load(path, path_explicit=True, environ={})
        message = str(caught.exception)
        self.assertIn(f"{path}: key {key}:", message)
        return message

    def test_every_key_declares_type_and_range(self):
        missing = [key for key in example_keys() if configspec.spec_of(field_of(key)) is None]
        self.assertEqual(missing, [], MISSING_SPEC.format(keys=", ".join(missing)))

    def test_every_key_refuses_wrong_types_and_out_of_range_values(self):
        walked = 0
        for key in example_keys():
            spec = configspec.spec_of(field_of(key))
            if spec is None:
                continue  # reported by test_every_key_declares_type_and_range
            self.assertIn("expected", self.load_with(key, spec.wrong_type()), key)
            out = spec.out_of_range()
            if not isinstance(spec, configspec.Boolean):
                self.assertTrue(out, f"{key}: its spec offers no out-of-range value")
            for value in out:
                self.assertIn("must", self.load_with(key, value), (key, value))
            walked += 1
        self.assertGreaterEqual(walked, 40)

    def test_numeric_ranges_are_documented_in_node_yaml(self):
        """Each number's line in node.yaml ends with its declared range, so the two agree."""
        import re

        comments, section = {}, None
        with open(EXAMPLE) as fh:
            for line in fh:
                top = re.match(r"^([a-z_]+):\s*(\S*)", line)
                if top:
                    section = None if top.group(2) else top.group(1)
                    key = top.group(1)
                sub = re.match(r"^  ([a-z_]+): [^#]*#\s*(.*)$", line)
                if sub and section:
                    comments[f"{section}.{sub.group(1)}"] = sub.group(2).strip()
                elif top and "#" in line:
                    comments[key] = line.split("#", 1)[1].strip()
        for key in example_keys():
            spec = configspec.spec_of(field_of(key))
            if isinstance(spec, (configspec.Integer, configspec.Number)):
                self.assertEqual(comments.get(key), spec.describe(), key)

    def test_the_reported_mistakes(self):
        message = self.load_with("hypervisor.keepalive_interval", -5)
        self.assertIn("must be between 1 and 3600, got -5", message)
        message = self.load_with("events.buffer_size", "100")
        self.assertIn("expected an integer, got '100' (a str) (write it without quotes)", message)

    def test_environment_and_flags_are_text_and_parsed(self):
        c = cfg.load(
            None,
            environ={
                "QUANTIX_EVENTS_BUFFER_SIZE": "100",
                "QUANTIX_AUTO_REGISTER": "yes",
                "QUANTIX_SERVER_METRICS_LISTEN": "off",
                "QUANTIX_NODE_LABELS": "rack=r1,zone=z",
                "QUANTIX_CONTROL_PLANE_TOKEN": "",
            },
        )
        self.assertEqual(c.events.buffer_size, 100)
        self.assertTrue(c.auto_register)
        self.assertIsNone(c.server.metrics_listen)
        self.assertEqual(c.node.labels, {"rack": "r1", "zone": "z"})
        self.assertIsNone(c.control_plane.token)
        with self.assertRaises(cfg.ConfigError) as caught:
            cfg.load(None, environ={"QUANTIX_HYPERVISOR_KEEPALIVE_COUNT": "0"})
        self.assertIn(
            "environment QUANTIX_HYPERVISOR_KEEPALIVE_COUNT: must be between 1 and 100", str(caught.exception)
        )

    def test_code_building_a_config_gets_the_same_checks(self):
        import attrs

        with self.assertRaises(ValueError):
            cfg.EventsConfig(buffer_size=0)
        with self.assertRaises(ValueError):
            cfg.HypervisorConfig(keepalive_interval="5")
        self.assertIsNone(attrs.evolve(cfg.ServerConfig(), metrics_listen="off").metrics_listen)
