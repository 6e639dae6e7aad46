#!/usr/bin/env python3
"""Interop scenarios for Rookery, driven by slixmpp (an independent client library).

Run by crates/rookery-test-support/tests/interop_slixmpp.rs against a test
server; writes one result per scenario to --out as JSON.
"""

import argparse
import asyncio
import logging
import ssl
import sys

import slixmpp

import scenarios

DOMAIN = "localhost"
TIMEOUT = 15


class Client(slixmpp.ClientXMPP):
    """A slixmpp client that records what it receives."""

    def __init__(self, jid, password, args, register=False, direct_tls=False):
        super().__init__(jid, password)
        self.ssl_context = ssl.create_default_context(cafile=args.ca)
        self.enable_direct_tls = direct_tls
        self.enable_starttls = not direct_tls
        self.enable_plaintext = False
        self.port = args.direct_port if direct_tls else args.port
        self.host = args.host
        for plugin in ["xep_0030", "xep_0092", "xep_0199", "xep_0198", "xep_0280", "xep_0203", "xep_0191"]:
            self.register_plugin(plugin)
        if register:
            self.register_plugin("xep_0077")
            self["xep_0077"].force_registration = True
            self.add_event_handler("register", self._register)
        self.messages = asyncio.Queue()
        self.carbons = asyncio.Queue()
        self.available = {}
        self.started = asyncio.Event()
        self.resumed = asyncio.Event()
        self.registered = asyncio.Event()
        self.add_event_handler("session_start", self._session_start)
        self.add_event_handler("session_resumed", lambda _: self.resumed.set())
        self.add_event_handler("message", lambda msg: self.messages.put_nowait(msg))
        self.add_event_handler("carbon_received", lambda msg: self.carbons.put_nowait(msg))
        self.add_event_handler("presence_available", self._available)

    def _available(self, presence):
        self.available[str(presence["from"])] = presence

    async def _register(self, _form):
        iq = self.Iq()
        iq["type"] = "set"
        iq["register"]["username"] = self.boundjid.user
        iq["register"]["password"] = self.password
        await iq.send()
        self.registered.set()

    async def _session_start(self, _event):
        self.send_presence()
        await self.get_roster()
        self.started.set()

    async def online(self):
        self.connect(self.host, self.port)
        await asyncio.wait_for(self.started.wait(), TIMEOUT)
        return self

    async def next_message(self):
        return await asyncio.wait_for(self.messages.get(), TIMEOUT)

    async def wait_for(self, condition, what):
        for _ in range(TIMEOUT * 20):
            if condition():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    async def stop(self):
        self.disconnect()
        await asyncio.sleep(0.2)


async def register(args):
    for user in ["alice", "bob"]:
        client = Client(f"{user}@{DOMAIN}/slix", "secret", args, register=True)
        client.connect(client.host, client.port)
        await asyncio.wait_for(client.registered.wait(), TIMEOUT)
        await asyncio.wait_for(client.started.wait(), TIMEOUT)
        await client.stop()


async def login_starttls(args):
    client = await Client(f"alice@{DOMAIN}/slix", "secret", args).online()
    assert client.boundjid.full == f"alice@{DOMAIN}/slix", client.boundjid.full
    await client.stop()


async def login_direct_tls(args):
    client = await Client(f"alice@{DOMAIN}/direct", "secret", args, direct_tls=True).online()
    assert client.boundjid.bare == f"alice@{DOMAIN}"
    await client.stop()


async def wrong_password(args):
    client = Client(f"alice@{DOMAIN}/slix", "wrong", args)
    failed = asyncio.Event()
    client.add_event_handler("failed_all_auth", lambda _: failed.set())
    client.connect(client.host, client.port)
    await asyncio.wait_for(failed.wait(), TIMEOUT)
    client.abort()


async def subscribe_presence_and_chat(args):
    alice = await Client(f"alice@{DOMAIN}/slix", "secret", args).online()
    bob = await Client(f"bob@{DOMAIN}/slix", "secret", args).online()
    # slixmpp approves and subscribes back by default.
    alice.send_presence_subscription(pto=f"bob@{DOMAIN}")
    await alice.wait_for(lambda: alice.client_roster[f"bob@{DOMAIN}"]["subscription"] == "both", "alice's subscription")
    await bob.wait_for(lambda: bob.client_roster[f"alice@{DOMAIN}"]["subscription"] == "both", "bob's subscription")
    await alice.wait_for(lambda: f"bob@{DOMAIN}/slix" in alice.available, "bob's presence at alice")
    await bob.wait_for(lambda: f"alice@{DOMAIN}/slix" in bob.available, "alice's presence at bob")
    alice.send_message(mto=f"bob@{DOMAIN}", mbody="hello bob", mtype="chat")
    message = await bob.next_message()
    assert message["body"] == "hello bob" and str(message["from"]) == f"alice@{DOMAIN}/slix", message
    bob.send_message(mto=f"alice@{DOMAIN}", mbody="hello alice", mtype="chat")
    message = await alice.next_message()
    assert message["body"] == "hello alice", message
    await alice.stop()
    await bob.stop()


async def offline_messages(args):
    alice = await Client(f"alice@{DOMAIN}/slix", "secret", args).online()
    alice.send_message(mto=f"bob@{DOMAIN}", mbody="while you were away", mtype="chat")
    await asyncio.sleep(0.3)
    bob = await Client(f"bob@{DOMAIN}/slix", "secret", args).online()
    message = await bob.next_message()
    assert message["body"] == "while you were away", message
    assert message["delay"]["stamp"] is not None, "XEP-0203 delay stamp"
    await alice.stop()
    await bob.stop()


async def carbons(args):
    phone = await Client(f"alice@{DOMAIN}/phone", "secret", args).online()
    laptop = await Client(f"alice@{DOMAIN}/laptop", "secret", args).online()
    bob = await Client(f"bob@{DOMAIN}/slix", "secret", args).online()
    await laptop["xep_0280"].enable()
    bob.send_message(mto=f"alice@{DOMAIN}/phone", mbody="for the phone", mtype="chat")
    message = await phone.next_message()
    assert message["body"] == "for the phone"
    carbon = await asyncio.wait_for(laptop.carbons.get(), TIMEOUT)
    assert carbon["carbon_received"]["body"] == "for the phone", carbon
    for client in (phone, laptop, bob):
        await client.stop()


async def stream_resumption(args):
    alice = await Client(f"alice@{DOMAIN}/resume", "secret", args).online()
    bob = await Client(f"bob@{DOMAIN}/slix", "secret", args).online()
    await alice.wait_for(lambda: alice["xep_0198"].sm_id is not None, "stream management")
    # The connection drops without a stream close, as on a network failure.
    alice.transport.abort()
    await asyncio.sleep(0.3)
    bob.send_message(mto=f"alice@{DOMAIN}/resume", mbody="while you were cut off", mtype="chat")
    await asyncio.sleep(0.3)
    alice.connect(alice.host, alice.port)
    await asyncio.wait_for(alice.resumed.wait(), TIMEOUT)
    message = await alice.next_message()
    assert message["body"] == "while you were cut off", message
    await alice.stop()
    await bob.stop()


async def server_services(args):
    alice = await Client(f"alice@{DOMAIN}/slix", "secret", args).online()
    info = await alice["xep_0030"].get_info(jid=DOMAIN, timeout=TIMEOUT)
    features = info["disco_info"]["features"]
    for feature in ["urn:xmpp:ping", "urn:xmpp:carbons:2", "urn:xmpp:blocking", "urn:xmpp:sm:3"]:
        assert feature in features, (feature, features)
    await alice["xep_0199"].ping(jid=DOMAIN, timeout=TIMEOUT)
    version = await alice["xep_0092"].get_version(DOMAIN, timeout=TIMEOUT)
    assert version["software_version"]["name"] == "Rookery", version
    blocked = await alice["xep_0191"].get_blocked(timeout=TIMEOUT)
    assert len(blocked["blocklist"]["items"]) == 0
    await alice.stop()


SCENARIOS = [
    register,
    login_starttls,
    login_direct_tls,
    wrong_password,
    subscribe_presence_and_chat,
    offline_messages,
    carbons,
    stream_resumption,
    server_services,
]


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--direct-port", type=int, required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    await scenarios.run(SCENARIOS, args, TIMEOUT * 3)


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
