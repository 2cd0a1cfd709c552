"""Ends one MPC through mpc-gateway with the official Plivo Python SDK.

Driven by tests/python_sdk.rs. Prints exactly one JSON line on stdout:
    {"ok": bool, "exception": <class name> | null, "message": <str> | null}
Anything the SDK itself prints (it prints a line before retrying a 5xx) goes to stderr.

    python stop_mpc.py --port P --auth-id MA... --token T (--name N | --uuid U)
                       [--basic-user USER]

--basic-user makes the Basic username differ from the auth id in the path, which the SDK
never does by itself (both come from `auth_id`): it stands for a misrouted or tampered
request and must be refused by the gateway.
"""

import argparse
import contextlib
import json
import sys

import plivo
import plivo.rest.client
import requests.auth


def point_sdk_at_gateway(base_url):
    # The SDK has no base-URL option: voice requests (MultiPartyCall included) read these
    # module constants at call time; the two fallbacks are used when retrying a 5xx.
    plivo.rest.client.API_VOICE_BASE_URI = base_url + "/v1/Account"
    plivo.rest.client.API_VOICE_BASE_URI_FALLBACK_1 = base_url + "/v1/Account"
    plivo.rest.client.API_VOICE_BASE_URI_FALLBACK_2 = base_url + "/v1/Account"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--auth-id", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--basic-user")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--name")
    target.add_argument("--uuid")
    args = parser.parse_args()

    point_sdk_at_gateway("http://127.0.0.1:%d" % args.port)

    result = {"ok": False, "exception": None, "message": None}
    try:
        with contextlib.redirect_stdout(sys.stderr):
            client = plivo.RestClient(args.auth_id, args.token, timeout=10)
            if args.basic_user is not None:
                client.session.auth = MismatchedBasic(
                    args.auth_id, args.basic_user, args.token
                )
            if args.name is not None:
                client.multi_party_calls.stop(friendly_name=args.name)
            else:
                client.multi_party_calls.stop(uuid=args.uuid)
        result["ok"] = True
    except Exception as err:  # report every failure, typed, to the Rust test
        result["exception"] = type(err).__name__
        result["message"] = str(err)
    print(json.dumps(result))


class MismatchedBasic(requests.auth.AuthBase):
    """Basic credentials whose username is not the auth id the SDK puts in the path.

    The SDK builds the path from `session.auth[0]`, so indexing yields the path's auth id
    while the header carries `user`.
    """

    def __init__(self, path_auth_id, user, token):
        self._path_auth_id = path_auth_id
        self._basic = requests.auth.HTTPBasicAuth(user, token)

    def __getitem__(self, index):
        return (self._path_auth_id, self._basic.password)[index]

    def __call__(self, request):
        return self._basic(request)


if __name__ == "__main__":
    main()
