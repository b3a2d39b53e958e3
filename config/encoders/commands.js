// Example downlink encoder: the body of ThingsBoard's
// `function Encoder(msg, metadata, msgType, integrationMetadata)`, run on every command the
// downlink consumes, like a ThingsBoard downlink data converter.
//
// msg                 - the command: the Kafka record's value, parsed when it is JSON (a string
//                       otherwise), for example {"method": "setInterval", "params": {"seconds": 60}}
// metadata            - the command's metadata, as strings
// msgType             - the command's message type, e.g. "RPC_CALL_FROM_SERVER_TO_DEVICE"
// integrationMetadata - the converter's [converters.<name>.metadata] table, integrationName (the
//                       converter's name unless that table sets it) and gatewayId
//
// Return one message {contentType, data, metadata}, an array of them, or null to send nothing.
//   contentType - "JSON" or "TEXT": data is sent as it is (a string: JSON.stringify objects);
//                 "BINARY": data is base64 (btoa), the device gets the decoded bytes
//   metadata    - optional; string, number or boolean values. This is what the downlink's routes
//                 match on and fill topic templates from.
// A script error (throw) fails the command: the downlink reports it instead of delivering.
// Try it: edgegate convert --encoder --script commands.js --msg command.json --metadata deviceName=T1

if (msg === null || typeof msg !== 'object' || typeof msg.method !== 'string') {
    throw new Error('not a command: expected {"method": ..., "params": ...}, got ' + JSON.stringify(msg));
}

var deviceName = metadata.deviceName || msg.deviceName;

return {
    contentType: "JSON",
    data: JSON.stringify({method: msg.method, params: msg.params === undefined ? {} : msg.params}),
    metadata: {
        deviceName: deviceName,
        method: msg.method
    }
};

// BINARY example, for a device that takes frames instead of JSON: setInterval as 3 bytes
// (opcode 0x01, then the interval in seconds, big-endian), base64-encoded.
//
// var seconds = msg.params.seconds;
// return {
//     contentType: "BINARY",
//     data: btoa(String.fromCharCode(0x01, (seconds >> 8) & 0xff, seconds & 0xff)),
//     metadata: {deviceName: deviceName}
// };
