"""What real clients send with their own defaults, written from their source (cited per fixture; no code copied).

Each fixture is a list of (method, path, headers, body) or a function that builds one; the tests replay them
against the app (fake engine) and, for SillyTavern, on the real tiny checkpoint.
"""

from __future__ import annotations

import base64

# ---------------------------------------------------------------------------------------------------
# SillyTavern, source "Stable Diffusion Web UI (AUTOMATIC1111)"
# Read in github:SillyTavern/SillyTavern @ ba6f7b7a (the stored snapshot):
# - public/scripts/extensions/stable-diffusion/index.js, `defaultSettings`: scale 7, steps 20, scheduler
#   'normal', width/height 512, prompt_prefix 'best quality, absurdres, aesthetic,', negative_prompt (below),
#   sampler 'DDIM', seed -1, restore_faces/enable_hr false, hr_upscaler 'Latent', hr_scale 2.0,
#   denoising_strength 0.7, hr_second_pass_steps 0, clip_skip 1, auto_auth ''.
# - `generateAutoImage()` builds the txt2img body below; seed -1 becomes undefined (left out of the JSON);
#   override_settings.sd_vae is undefined unless a VAE other than the placeholder 'Automatic' is picked.
# - `generatePicture()` re-reads the sampler from the dropdown, which `loadSamplers()` fills from
#   /sdapi/v1/samplers: the 'DDIM' default never reaches an A1111 server, the first listed sampler does.
#   `onSourceChange()` clears sampler/scheduler/vae, then the first of each list is picked; a kept
#   scheduler ('normal') is sent as it is.
# - Connect (`validateAutoUrl()` then `loadSettingOptions()`): ping = GET /sdapi/v1/options; samplers; models =
#   GET /sdapi/v1/options (current model) + GET /sdapi/v1/sd-models + GET /sdapi/v1/upscalers and
#   /sdapi/v1/latent-upscale-modes; schedulers; vaes = GET /sdapi/v1/sd-vae. Picking the model POSTs
#   /sdapi/v1/options {sd_model_checkpoint} and polls /sdapi/v1/progress.
# - src/endpoints/stable-diffusion.js: every call carries `Authorization: Basic base64(auth)` (auth as typed,
#   'user:pass'); /generate forwards the browser's whole body, its `url` and `auth` included.

SILLYTAVERN_NEGATIVE = ("lowres, bad anatomy, bad hands, text, error, cropped, worst quality, low quality, normal "
                        "quality, jpeg artifacts, signature, watermark, username, blurry")
SILLYTAVERN_PREFIX = "best quality, absurdres, aesthetic,"


def basic(auth: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}


def sillytavern_connect(auth: str) -> list[tuple[str, str, dict, dict | None]]:
    h = basic(auth)
    return [("GET", "/sdapi/v1/options", h, None), ("GET", "/sdapi/v1/samplers", h, None),
            ("GET", "/sdapi/v1/options", h, None), ("GET", "/sdapi/v1/sd-models", h, None),
            ("GET", "/sdapi/v1/upscalers", h, None), ("GET", "/sdapi/v1/latent-upscale-modes", h, None),
            ("GET", "/sdapi/v1/schedulers", h, None), ("GET", "/sdapi/v1/sd-vae", h, None)]


def sillytavern_set_model(auth: str, model: str) -> list[tuple[str, str, dict, dict | None]]:
    return [("POST", "/sdapi/v1/options", basic(auth), {"sd_model_checkpoint": model}),
            ("GET", "/sdapi/v1/progress", basic(auth), None)]


def sillytavern_txt2img(auth: str, url: str, prompt: str, sampler: str, **override) -> dict:
    """The body as SillyTavern's server forwards it; `override` only where a test must stay cheap (size, steps)."""
    body = {"url": url, "auth": auth, "prompt": f"{SILLYTAVERN_PREFIX} {prompt}", "negative_prompt": SILLYTAVERN_NEGATIVE,
            "sampler_name": sampler, "scheduler": "normal", "steps": 20, "cfg_scale": 7, "width": 512, "height": 512,
            "restore_faces": False, "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 2.0,
            "denoising_strength": 0.7, "hr_second_pass_steps": 0, "override_settings": {"CLIP_stop_at_last_layers": 1},
            "override_settings_restore_afterwards": True, "clip_skip": 1, "save_images": True, "send_images": True,
            "do_not_save_grid": False, "do_not_save_samples": False}
    return {**body, **override}


# ---------------------------------------------------------------------------------------------------
# Open WebUI, image engine "openai", with only the base URL (and a key) typed.
# Read in github:open-webui/open-webui @ 02530d50, backend/open_webui/routers/images.py and config.py:
# - `get_image_model()`: the "openai" engine with IMAGE_GENERATION_MODEL left empty sends 'dall-e-2'.
# - `image_generations()`: POST {base}/images/generations, Bearer key, JSON {model, prompt, n (1), size
#   (IMAGE_SIZE, default '512x512')}, plus response_format 'b64_json' because the configured model ('') does not
#   match IMAGE_URL_RESPONSE_MODELS_REGEX_PATTERN '^gpt-image'.
# - `image_edits()`: multipart {base}/images/edits with model = IMAGE_EDIT_MODEL (left empty: ''), prompt,
#   response_format 'b64_json', no size (IMAGE_EDIT_SIZE empty), no n; a list of images (a chat's) goes as
#   one `image[]` part each, named '<uuid>.png'. No mask.

def openwebui_generation(prompt: str) -> dict:
    return {"model": "dall-e-2", "prompt": prompt, "n": 1, "size": "512x512", "response_format": "b64_json"}


def openwebui_edit(prompt: str, images: list[bytes]) -> tuple[dict, list]:
    data = {"model": "", "prompt": prompt, "response_format": "b64_json"}
    files = [("image[]", (f"0f8e2c4a-{k:04d}.png", im, "image/png")) for k, im in enumerate(images)]
    return data, files


# ---------------------------------------------------------------------------------------------------
# ComfyUI's stock OpenAI nodes under --comfy-api-base http://HOST:PORT.
# Read in github:comfyanonymous/ComfyUI @ 0413db9d, comfy_api_nodes/nodes_openai.py (node defaults) and, per
# the server research brief (section 1.8), apis/openai.py (the request models carry no seed: it never reaches the wire):
# - OpenAIDalle2: POST /proxy/openai/images/generations {model 'dall-e-2', prompt, n 1 (max 8), size '1024x1024'}.
# - OpenAIDalle3: {model 'dall-e-3', prompt, quality 'standard', style 'natural', size '1024x1024'}.
# - OpenAIGPTImage1: {model 'gpt-image-1.5' (widget default), prompt, quality 'low', background 'auto',
#   size 'auto', n 1 (max 8), moderation 'low'}; with an image batch of more than one: `image[]` parts.

def comfyui_requests(prompt: str) -> list[dict]:
    return [{"model": "dall-e-2", "prompt": prompt, "n": 1, "size": "1024x1024"},
            {"model": "dall-e-3", "prompt": prompt, "quality": "standard", "style": "natural", "size": "1024x1024"},
            {"model": "gpt-image-1.5", "prompt": prompt, "quality": "low", "background": "auto", "size": "auto",
             "n": 1, "moderation": "low"}]
