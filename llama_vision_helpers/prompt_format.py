"""The Llama 3.2 Vision prompt format: its special tokens and a chat template that renders it exactly."""

SPECIAL_TOKENS = {
    "bos": "<|begin_of_text|>",
    "eos": "<|end_of_text|>",
    "pad": "<|finetune_right_pad_id|>",
    "start_header": "<|start_header_id|>",
    "end_header": "<|end_header_id|>",
    "eom": "<|eom_id|>",
    "eot": "<|eot_id|>",
    "python": "<|python_tag|>",
    "image": "<|image|>",
}

# Same output as the Llama 3.2 Vision template for user/assistant turns with images and text:
# images and a system message do not mix, and a conversation without images opens with the
# default system block (with a fixed date, so prompts are reproducible).
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'][0]['text'] %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{%- set ns = namespace(has_images=false) %}"
    "{%- for message in messages %}{%- if message['content'] is not string %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}"
    "{%- set ns.has_images = true %}{%- endif %}{%- endfor %}{%- endif %}{%- endfor %}"
    "{%- if ns.has_images and system_message != '' %}"
    "{{- raise_exception('Prompting with images is incompatible with system messages.') }}"
    "{%- endif %}"
    "{%- if not ns.has_images %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def vision_prompt(text: str) -> str:
    """The exact prompt the model expects for one image and one user instruction."""
    return (
        f"{SPECIAL_TOKENS['bos']}{SPECIAL_TOKENS['start_header']}user{SPECIAL_TOKENS['end_header']}\n\n"
        f"{SPECIAL_TOKENS['image']}{text}{SPECIAL_TOKENS['eot']}"
        f"{SPECIAL_TOKENS['start_header']}assistant{SPECIAL_TOKENS['end_header']}\n\n"
    )
