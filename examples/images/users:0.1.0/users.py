# users: a small REST resource in the style of the original DROP's L7 functions. Every request
# arrives as one JSON envelope line: {"uri", "headers", "args", "data", "method"}. The reply is
# one JSON line whose x_res_code sets the HTTP status, x_res_body the body and x_res_headers
# extra headers. State lives in the worker's memory (one worker: `num: 1`).
import json
import sys

NEWLINE = "\tncm\t"
users = {}


def answer(code, body, headers=None):
    out = {"x_res_code": code, "x_res_body": body}
    if headers:
        out["x_res_headers"] = headers
    return out


def handle(req):
    method = req["method"]
    parts = req["uri"].split("?")[0].strip("/").split("/")
    # /api/v1/users[/<id>]
    user_id = parts[3] if len(parts) > 3 else None
    if method == "get" and user_id is None:
        names = sorted(users)
        prefix = req["args"].get("prefix", "")
        return answer(200, [n for n in names if n.startswith(prefix)])
    if method == "get":
        if user_id not in users:
            return answer(404, {"error": "no user " + user_id})
        return answer(200, users[user_id])
    if method in ("post", "put") and user_id is not None:
        try:
            users[user_id] = json.loads(req["data"])
        except ValueError:
            return answer(400, "the body is not JSON")
        return answer(201, "", {"Location": "/api/v1/users/" + user_id})
    if method == "delete" and user_id is not None:
        users.pop(user_id, None)
        return answer(204, "")
    if method == "patch":
        return {"x_res_code": 99, "x_res_body": "a status that cannot be"}
    if method == "options":
        # Not an envelope answer at all: passes through as 200.
        return "GET, POST, PUT, DELETE"
    return answer(405, "method " + method + " is not allowed here", {"Allow": "GET, POST, PUT, DELETE"})


def main():
    for line in sys.stdin:
        req = json.loads(line.rstrip("\n").replace(NEWLINE, "\n"))
        reply = handle(req)
        text = reply if isinstance(reply, str) else json.dumps(reply)
        sys.stdout.write(text.replace("\n", NEWLINE) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
