"""The emulator held to today's reference (api-2026-12.md): models.list/get, shut-down models, Google's JSON front
end (unknown fields refused, lenient syntax, camelCase out), the undocumented behaviours as switches, thinking,
and the account's money limits. Raw HTTP where a client that follows Google's documentation (not the SDK) would."""

from __future__ import annotations

import json
import time

import pytest
from google.genai import errors, types

from tests.emulator_support import FLASH, FLASH31, PRO, line, raw, upload_lines, wait

GEN = "/v1beta/models/gemini-3.1-flash-image:generateContent"


def body(**generation_config) -> dict:
    return {"contents": [{"parts": [{"text": "a kite"}]}], "generationConfig": {"responseModalities": ["IMAGE"], **generation_config}}


# ---- models ---------------------------------------------------------------------------------------------------

def test_models_list_and_get_show_todays_models_with_their_methods(emu, c):
    listed = {m.name: m for m in c.models.list()}
    assert {"models/gemini-3.1-flash-image", "models/gemini-3-pro-image", "models/gemini-2.5-flash-image"} <= set(listed)
    assert "models/gemini-3-pro-image-preview" not in listed  # shut down on 2026-06-25
    m = c.models.get(model="gemini-3.1-flash-image")
    assert m.supported_actions == ["generateContent", "countTokens", "batchGenerateContent"]
    assert m.display_name == "Nano Banana 2" and m.thinking is True and m.input_token_limit == 65536
    code, _, raw_body = raw(emu, "GET", "/v1beta/models/gemini-3-pro-image")
    assert code == 200 and json.loads(raw_body)["supportedGenerationMethods"][-1] == "batchGenerateContent"
    with pytest.raises(errors.ClientError) as info:
        c.models.get(model="gemini-3-pro-image-preview")
    assert info.value.code == 404


@pytest.mark.parametrize("call", ["generateContent", "batchGenerateContent"])
def test_a_shut_down_model_answers_404_with_the_real_message(emu, call):
    b = body() if call == "generateContent" else {"batch": {"inputConfig": {"fileName": "files/x"}}}
    code, _, raw_body = raw(emu, "POST", f"/v1beta/models/gemini-3-pro-image-preview:{call}", b)
    assert code == 404
    assert json.loads(raw_body)["error"] == {
        "code": 404, "status": "NOT_FOUND",
        "message": f"models/gemini-3-pro-image-preview is not found for API version v1beta, or is not supported for {call}. "
                   "Call ListModels to see the list of available models and their supported methods."}


def test_which_models_are_shut_down_is_configurable(emu, c):
    emu.configure(shutdown_models=["gemini-2.5-flash-image"])
    assert "models/gemini-2.5-flash-image" not in {m.name for m in c.models.list()}
    assert "models/gemini-3-pro-image-preview" in {m.name for m in c.models.list()}  # a list replaces the dates
    with pytest.raises(errors.ClientError) as info:
        c.models.generate_content(model=FLASH, contents="x")
    assert info.value.code == 404


# ---- Google's JSON front end --------------------------------------------------------------------------------

def test_an_unknown_field_anywhere_is_a_400_naming_it(emu):
    code, _, raw_body = raw(emu, "POST", GEN, body(fooBar=1))
    assert code == 400
    err = json.loads(raw_body)["error"]
    message = "Invalid JSON payload received. Unknown name \"fooBar\" at 'generation_config': Cannot find field."
    assert err["status"] == "INVALID_ARGUMENT" and err["message"] == message
    assert err["details"] == [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                               "fieldViolations": [{"field": "generation_config", "description": message}]}]
    code, _, raw_body = raw(emu, "POST", GEN, {**body(), "size": "1K"})  # at the top: no path
    err = json.loads(raw_body)["error"]
    assert code == 400 and err["message"] == 'Invalid JSON payload received. Unknown name "size": Cannot find field.'
    assert err["details"][0]["fieldViolations"] == [{"description": err["message"]}]
    code, _, raw_body = raw(emu, "POST", GEN, body(image_config={"aspect_ratio": "1:1", "outputMimeType": "image/jpeg"},
                                                   thinkingConfig={"thinkingLevel": "high", "effort": 1}))
    err = json.loads(raw_body)["error"]
    assert code == 400 and err["message"].split("\n") == [
        "Invalid JSON payload received. Unknown name \"outputMimeType\" at 'generation_config.image_config': Cannot find field.",
        "Invalid JSON payload received. Unknown name \"effort\" at 'generation_config.thinking_config': Cannot find field."]
    bad_part = {"contents": [{"parts": [{"text": "x", "colour": "red"}]}]}
    err = json.loads(raw(emu, "POST", GEN, bad_part)[2])["error"]
    assert "at 'contents[0].parts[0]'" in err["message"]


def test_fields_the_sdk_can_send_are_known(emu):
    # google-genai 3.3-3.6 writes these for the Gemini API; none is an image option, none may be a 400.
    req = {"contents": [{"parts": [{"text": "a kite", "mediaProcessing": {}, "documentMetadata": {}},
                                   {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo=", "displayName": "ref"}}]}],
           "generationConfig": {"responseModalities": ["IMAGE"], "audioTranscriptionConfig": {}},
           "continuationToken": "abc"}
    code, _, raw_body = raw(emu, "POST", GEN, req)
    assert code == 200, raw_body


def test_an_unknown_field_in_a_jsonl_line_is_that_lines_error(emu, c):
    good = line("ok", "a boat")
    bad = json.dumps({"key": "bad", "request": {"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"fooBar": 1}}})
    f = upload_lines(c, [good, bad])
    job = wait(c, c.batches.create(model=FLASH31, src=f.name).name)
    out = {o["key"]: o for o in map(json.loads, c.files.download(file=job.dest.file_name).decode().splitlines())}
    assert "response" in out["ok"]
    assert out["bad"]["error"]["status"] == "INVALID_ARGUMENT" and 'Unknown name "fooBar"' in out["bad"]["error"]["message"]


def test_googles_lenient_json_with_single_quotes_is_accepted(emu):
    # As the documentation's curl examples send it.
    text = b"{'contents': [{'parts': [{'text': 'a kite, \"red\" and it\\'s windy'}]}], 'generationConfig': {'responseModalities': ['IMAGE']}}"
    code, _, raw_body = raw(emu, "POST", GEN, text, headers={"Content-Type": "application/json"})
    assert code == 200, raw_body
    assert json.loads(raw_body)["candidates"][0]["content"]["parts"][-1]["inlineData"]["mimeType"] == "image/png"
    code, _, raw_body = raw(emu, "POST", GEN, b"{'contents': [", headers={"Content-Type": "application/json"})
    assert code == 400 and json.loads(raw_body)["error"]["message"].startswith("Invalid JSON payload received.")


def test_output_is_camel_case_whatever_the_input_case(emu, c):
    f = upload_lines(c, [line("a", "x")])
    code, _, raw_body = raw(emu, "POST", f"/v1beta/models/{FLASH31}:batchGenerateContent",
                            {"batch": {"display_name": "snake", "input_config": {"file_name": f.name}}})
    assert code == 200, raw_body
    md = json.loads(raw_body)["metadata"]
    assert md["inputConfig"] == {"fileName": f.name} and md["displayName"] == "snake"
    inline = {"batch": {"input_config": {"requests": {"requests": [
        {"request": {"contents": [{"parts": [{"text": "x"}]}], "generation_config": {"response_modalities": ["IMAGE"]}},
         "metadata": {"my_key": "k1"}}]}}}}
    md = json.loads(raw(emu, "POST", f"/v1beta/models/{FLASH31}:batchGenerateContent", inline)[2])["metadata"]
    item = md["inputConfig"]["requests"]["requests"][0]
    assert "generationConfig" in item["request"] and item["metadata"] == {"my_key": "k1"}  # metadata is the caller's


# ---- what the documentation does not say: switches ----------------------------------------------------------

def test_an_upload_start_without_a_declared_length_is_accepted_unless_strict(emu):
    headers = {"X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
               "X-Goog-Upload-Header-Content-Type": "jsonl", "Content-Type": "application/json"}
    code, h, _ = raw(emu, "POST", "/upload/v1beta/files", {"file": {"display_name": "x"}}, headers=headers)
    assert code == 200
    data = (line("a", "x") + "\n").encode()
    code, h2, raw_body = raw(emu, "POST", h["X-Goog-Upload-URL"], data, key=None, headers={
        "X-Goog-Upload-Command": "upload, finalize", "X-Goog-Upload-Offset": "0"})
    assert code == 200 and json.loads(raw_body)["file"]["sizeBytes"] == str(len(data))
    emu.configure(strict_upload_length=True)
    code, _, raw_body = raw(emu, "POST", "/upload/v1beta/files", {"file": {"display_name": "x"}}, headers=headers)
    assert code == 400 and "X-Goog-Upload-Header-Content-Length" in json.loads(raw_body)["error"]["message"]


def test_a_line_without_a_key_gets_a_keyless_result_unless_strict(emu, c):
    keyless = json.dumps({"request": json.loads(line("k", "x"))["request"]})
    for strict, want in ((False, "response"), (True, "error")):
        emu.configure(strict_line_keys=strict)
        f = upload_lines(c, [keyless])
        job = wait(c, c.batches.create(model=FLASH31, src=f.name).name)
        (out,) = [json.loads(x) for x in c.files.download(file=job.dest.file_name).decode().splitlines()]
        assert want in out and "key" not in out


# ---- thinking ---------------------------------------------------------------------------------------------------

def test_thinking_models_bill_thoughts_and_show_drafts_when_asked(emu, c):
    r = c.models.generate_content(model=PRO, contents="a fox", config={"response_modalities": ["IMAGE"]})
    assert 100 <= r.usage_metadata.thoughts_token_count < 300
    assert [bool(p.thought) for p in r.candidates[0].content.parts] == [False]  # drafts only when asked
    r = c.models.generate_content(model=PRO, contents="a fox", config=types.GenerateContentConfig(
        response_modalities=["IMAGE"], thinking_config=types.ThinkingConfig(include_thoughts=True)))
    parts = r.candidates[0].content.parts
    assert [bool(p.thought) for p in parts] == [True, True, False] and parts[1].inline_data and parts[2].thought_signature
    r = c.models.generate_content(model=FLASH, contents="a fox", config={"response_modalities": ["IMAGE"]})
    assert r.usage_metadata.thoughts_token_count is None  # 2.5 Flash Image does not think


# ---- money ------------------------------------------------------------------------------------------------------

def test_spend_is_billed_at_the_catalog_prices(emu, c):
    r = c.models.generate_content(model=FLASH31, contents="a kite", config={"response_modalities": ["IMAGE"]})
    u = r.usage_metadata
    assert emu.stats()["spend_usd_total"] == pytest.approx(
        (u.prompt_token_count * 0.5 + 1120 * 60 + u.thoughts_token_count * 3) / 1e6, abs=1e-6)


def test_money_limits_answer_with_the_real_envelopes(emu, c):
    def refused():
        return raw(emu, "POST", GEN, body())

    emu.configure(spent_this_month_usd=250.0)  # Tier 1's cap on the billing account
    code, _, b = refused()
    assert code == 429 and json.loads(b)["error"]["message"].startswith(
        "Your billing account has exceeded its monthly spending cap.")
    emu.configure(spent_this_month_usd=0.0, project_spend_cap_usd=0.0)
    code, _, b = refused()
    assert code == 429 and json.loads(b)["error"]["message"].startswith("Your project has exceeded its monthly spending cap.")
    emu.configure(project_spend_cap_usd=None, prepay_balance_usd=0.0)
    code, _, b = refused()
    err = json.loads(b)["error"]
    assert code == 402 and err["status"] == "RESOURCE_EXHAUSTED" and err["message"].startswith("Your prepayment credits are depleted.")
    emu.configure(prepay_status=429)  # as before mid-2026
    assert refused()[0] == 429
    emu.configure(prepay_balance_usd=None, spend_rate_usd_per_10min=0.05)
    assert refused()[0] == 200  # $0.068: the last 10 minutes' spend is over the rate now
    code, _, b = refused()
    err = json.loads(b)["error"]
    assert code == 429 and err["message"].startswith("You exceeded your spend-based rate limit.")
    delay = next(d["retryDelay"] for d in err["details"] if d["@type"].endswith("RetryInfo"))
    assert 590 <= int(delay.rstrip("s")) <= 600
    emu.advance(601)  # the window moves on
    assert refused()[0] == 200


def test_a_project_cap_counts_the_projects_spend_not_the_accounts(emu):
    # The billing account spent $100 elsewhere this month (under Tier 3's cap); this project has a $0.10 cap.
    emu.configure(tier="3", spent_this_month_usd=100.0, project_spend_cap_usd=0.10)
    assert raw(emu, "POST", GEN, body())[0] == 200  # $0.068: this project's first spend
    assert raw(emu, "POST", GEN, body())[0] == 200  # $0.136 after it: the cap is met
    code, _, b = raw(emu, "POST", GEN, body())
    assert code == 429 and json.loads(b)["error"]["message"].startswith("Your project has exceeded its monthly spending cap.")


def test_a_new_month_lifts_the_monthly_caps(emu):
    emu.configure(spent_this_month_usd=300.0)
    assert raw(emu, "POST", GEN, body())[0] == 429
    now = time.gmtime(emu.now())
    days_left = 32 - now.tm_mday  # past the first of next month
    emu.advance(days_left * 86400)
    assert raw(emu, "POST", GEN, body())[0] == 200


# ---- a client that follows the documentation, not the SDK ----------------------------------------------------

def test_the_batch_guides_rest_example_works_step_by_step(emu):
    """The REST (curl) path of ai.google.dev/gemini-api/docs/batch-api, as written there: bare GenerateContentRequest
    lines, `{'file': {'display_name': ...}}` with single quotes, `upload, finalize` in one chunk, a single-quoted
    snake_case create body, polling the batch, and the `/download/` URL of its results."""
    lines = (b'{"contents": [{"parts": [{"text": "Describe the process of photosynthesis."}]}], "generationConfig": '
             b'{"temperature": 0.7}}\n{"contents": [{"parts": [{"text": "What are the main ingredients in a Margherita pizza?"}]}]}\n')
    code, headers, _ = raw(emu, "POST", "/upload/v1beta/files", b"{'file': {'display_name': 'BatchInput'}}", headers={
        "X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
        "X-Goog-Upload-Header-Content-Length": str(len(lines)), "X-Goog-Upload-Header-Content-Type": "application/json",
        "Content-Type": "application/jsonl"})
    assert code == 200
    upload_url = {k.lower(): v for k, v in headers.items()}["x-goog-upload-url"]
    code, _, file_info = raw(emu, "POST", upload_url, lines, key=None, headers={
        "Content-Length": str(len(lines)), "X-Goog-Upload-Offset": "0", "X-Goog-Upload-Command": "upload, finalize"})
    assert code == 200
    file_name = json.loads(file_info)["file"]["name"]
    create = ("{'batch': {'display_name': 'my-batch-requests', 'input_config': {'file_name': '%s'}}}" % file_name).encode()
    code, _, op = raw(emu, "POST", f"/v1beta/models/{FLASH31}:batchGenerateContent", create,
                      headers={"Content-Type": "application/json"})
    assert code == 200, op
    name = json.loads(op)["name"]
    deadline = time.monotonic() + 15
    while True:
        batch = json.loads(raw(emu, "GET", f"/v1beta/{name}")[2])
        if batch["metadata"]["state"] in ("BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED"):
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert batch["metadata"]["state"] == "BATCH_STATE_SUCCEEDED"
    responses_file = batch["response"]["responsesFile"]
    code, _, results = raw(emu, "GET", f"/download/v1beta/{responses_file}:download?alt=media")
    out = [json.loads(x) for x in results.decode().splitlines()]
    assert code == 200 and len(out) == 2 and all("response" in o and "key" not in o for o in out)
