// Key Vault (RBAC authorization, no access policies) holding the scoring proxy's keys. The Function App reads
// them through a Key Vault reference in PROXY_API_KEYS, resolved with its user-assigned identity.
@description('Name of the vault (3-24 characters).')
@minLength(3)
@maxLength(24)
param name string

@description('Region of the vault.')
param location string = resourceGroup().location

@description('Tags of the vault.')
param tags object = {}

@secure()
@description('Comma-separated keys the scoring proxy accepts.')
param proxyApiKeys string

@description('Name of the secret holding proxyApiKeys.')
param proxyKeysSecretName string = 'proxy-api-keys'

@description('Principal id of the app\'s user-assigned identity (gets Key Vault Secrets User).')
param appPrincipalId string

@description('Principal id of the deploying user; empty = none. Gets Key Vault Secrets User to read the proxy key.')
param userPrincipalId string = ''

@allowed([
  'User'
  'ServicePrincipal'
])
@description('Kind of principal that userPrincipalId is.')
param userPrincipalType string = 'User'

var secretsUserRoleId = '4633458b-17de-408a-b874-0445c86b69e6' // Key Vault Secrets User

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: tenant().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 7
    publicNetworkAccess: 'Enabled'
  }
}

resource proxyKeys 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  parent: vault
  name: proxyKeysSecretName
  properties: {
    value: proxyApiKeys
    contentType: 'text/plain'
  }
}

resource appSecretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, appPrincipalId, secretsUserRoleId)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', secretsUserRoleId)
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
  }
}

resource userSecretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(userPrincipalId)) {
  name: guid(vault.id, userPrincipalId, secretsUserRoleId)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', secretsUserRoleId)
    principalId: userPrincipalId
    principalType: userPrincipalType
  }
}

output name string = vault.name
output proxyKeysSecretName string = proxyKeys.name
// Versionless, so a rotated secret is picked up without redeploying.
output proxyKeysSecretUri string = proxyKeys.properties.secretUri
